"""The per-job log cap end to end: head and tail kept, the middle dropped, readers told."""

from __future__ import annotations

from tests.support.cluster_plugin import Cluster
from tests.support.ws import Subscriber


def test_a_huge_log_keeps_its_head_and_tail_with_a_marker(cluster: Cluster) -> None:
    server = cluster.server(env={"YM_LOG_CAP_BYTES": str(1 << 20)})
    cluster.agent(server, "p1", executor="process")
    # About 3 MiB: numbered 100-byte lines, so head and tail can be recognised.
    script = "i=0; while [ $i -lt 30000 ]; do printf 'line %05d %089d\\n' $i 0; i=$((i+1)); done"
    job = server.submit(image="none", command=script)
    server.wait_state(job["id"], "succeeded", timeout=90)

    page = server.api("GET", f"/api/v1/jobs/{job['id']}/logs?limit=10000")
    entries, truncated = page["entries"], page["truncated"]
    assert len(truncated) == 1 and truncated[0]["to_offset"] > truncated[0]["from_offset"]
    stored = sum(len(e["text"]) for e in entries)
    assert stored <= 1 << 20
    text = server.api("GET", f"/api/v1/jobs/{job['id']}/logs?format=text&limit=10000")
    assert text.startswith("line 00000 ") and text.rstrip("\n").endswith(f"line 29999 {0:089d}")
    assert text.count("bytes of output dropped here (per-job log cap)") == 1

    sub = Subscriber(server.ws_url, server.admin_key, f"job:{job['id']}", from_offset=0)
    try:
        sub.wait_for(lambda s: any(m["type"] == "truncated" for m in s.messages), what="truncated")
        sub.wait_for(lambda s: s.logs() and s.logs()[-1]["offset"] == entries[-1]["offset"], what="the tail")
        marker = next(m for m in sub.messages if m["type"] == "truncated")
        assert marker["offset"] == truncated[0]["to_offset"]
        assert [m["offset"] for m in sub.logs()] == [e["offset"] for e in entries]
    finally:
        sub.close()
