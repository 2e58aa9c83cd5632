"""The server's app, once started, moves what start-up made out of the garbage collector's sight
and collects young objects less often; an app built for tests leaves the collector alone. Each
case runs in a fresh interpreter: freezing would keep this test process's garbage forever."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from yardmaster.server.app import GC_GEN0_THRESHOLD

PROBE = """
import gc, json, sys, warnings
warnings.simplefilter("ignore")
from starlette.testclient import TestClient
from yardmaster.server.app import build_app
from yardmaster.server.serve import uvicorn_config
from yardmaster.server.settings import load_settings

settings = load_settings({"YM_DATA_DIR": sys.argv[1]})
app = uvicorn_config(settings).app if sys.argv[2] == "server" else build_app(settings)
before = gc.get_freeze_count()
with TestClient(app, base_url="http://127.0.0.1:8080"):
    print(json.dumps({"before": before, "frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()}))
"""


def _probe(tmp_path: Path, kind: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / kind), kind], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_server_app_freezes_start_up_objects_and_raises_the_young_threshold(tmp_path: Path) -> None:
    seen = _probe(tmp_path, "server")
    assert seen["before"] == 0
    assert isinstance(seen["frozen"], int) and seen["frozen"] > 10_000  # modules, classes, the runtime
    assert seen["threshold"] == [GC_GEN0_THRESHOLD, 10, 10]


def test_an_app_built_for_tests_leaves_the_collector_alone(tmp_path: Path) -> None:
    seen = _probe(tmp_path, "test")
    assert seen["frozen"] == 0
    assert seen["threshold"] == [700, 10, 10]
