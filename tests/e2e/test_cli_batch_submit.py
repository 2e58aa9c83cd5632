"""`yardmaster submit-batch` against a real server: all of a file's jobs queued in order, or none."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.test_cli import yardmaster
from tests.support.cluster_plugin import Cluster


def test_submit_batch_prints_the_ids_in_order_or_refuses_the_whole_file(cluster: Cluster, tmp_path: Path) -> None:
    server = cluster.server()
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([{"image": "x", "command": ["true"], "labels": ["nobody"], "priority": i} for i in range(3)]))
    done = yardmaster(server, "submit-batch", str(path))
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert [server.job(job_id)["spec"]["priority"] for job_id in ids] == [0, 1, 2]
    path.write_text(json.dumps([{"image": "x", "command": ["true"]}, {"image": "x", "command": ["true"], "user": "0"}]))
    refused = yardmaster(server, "submit-batch", str(path))
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("error: invalid job spec: [1].user: ") and "Traceback" not in refused.stderr
    assert len(server.api("GET", "/api/v1/jobs")["jobs"]) == 3
