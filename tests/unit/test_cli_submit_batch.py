"""`yardmaster submit-batch FILE`: reading the specs (pure; the command against a real server is
in tests/e2e/test_cli_batch_submit.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.unit.test_cli_and_sdk import parse
from yardmaster.server import cli_commands as cli

SPECS = [{"image": "busybox", "command": ["true"]}, {"image": "busybox", "command": "echo hi"}]


def test_submit_batch_takes_a_file_or_stdin(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(SPECS))
    args = parse(["submit-batch", str(path)])
    assert args.client_handler is cli.cmd_submit_batch
    assert cli.read_batch_file(args.file) == SPECS
    assert cli.read_batch_file("-", io.StringIO(json.dumps(SPECS))) == SPECS
    path.write_text(json.dumps(SPECS[0]))
    assert cli.read_batch_file(str(path)) == [SPECS[0]]  # one spec is a batch of one


@pytest.mark.parametrize(
    ("content", "complaint"),
    [(None, "cannot read"), ("[{", "is not JSON"), ("42", "must hold a JSON array"), ('"x"', "must hold a JSON array")],
)
def test_a_bad_file_is_a_usage_error(tmp_path: Path, content: str | None, complaint: str) -> None:
    path = tmp_path / "jobs.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(cli.UsageError, match=complaint):
        cli.read_batch_file(str(path))
