"""Scale-out: three real server replicas over one real redis-server and one shared SQLite file,
with real agent processes (process executor) connected to different replicas.

Every replica runs with the fast test timings of tests/support/cluster.py (leader lock TTL 2 s,
renewed every 0.5 s; agent lease 3 s; job-assign acknowledged within 3 s).
"""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import HttpError, ServerProcess, http, wait_until
from tests.support.cluster_plugin import Cluster
from tests.support.redis_server import RedisServer
from tests.support.ws import Subscriber

pytestmark = pytest.mark.redis

IMAGE = "none"  # the process executor ignores the image
LOCK_TTL_S = 2.0
RENEW_S = 0.5
CANCEL_ACK = 'yardmaster_ws_messages_total{channel="agent",direction="in",type="cancel-ack"}'


# ---- helpers -------------------------------------------------------------------------------------


def exact_metric(server: ServerProcess, series: str) -> float:
    """The value of one exposition line whose series (name and labels) is exactly `series`."""
    for line in server.api("GET", "/metrics").splitlines():
        if line.rsplit(" ", 1)[0] == series:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def cluster_view(server: ServerProcess) -> dict[str, Any]:
    return server.api("GET", "/api/v1/cluster")


def leader_of(servers: list[ServerProcess]) -> tuple[ServerProcess, int]:
    """The replica that holds the scheduler lock and the epoch, asked of any live replica."""
    view = wait_until(lambda: _leader_view(servers), 15, 0.05, "a scheduler leader")
    by_id = {s.env["YM_REPLICA_ID"]: s for s in servers}
    return by_id[view["leader"]], int(view["epoch"])


def _leader_view(servers: list[ServerProcess]) -> dict[str, Any] | None:
    for srv in servers:
        if srv.proc is None:
            continue
        try:
            view = cluster_view(srv)
        except (OSError, HttpError):
            continue
        if view["leader"] is not None:
            return view
    return None


def rid(server: ServerProcess) -> str:
    return server.env["YM_REPLICA_ID"]


def urls_from(first: ServerProcess, servers: list[ServerProcess]) -> list[str]:
    """An agent's server list: its own replica first, then the others (so it fails over)."""
    return [first.url] + [s.url for s in servers if s is not first]


def replica_of_agent(server: ServerProcess, agent_id: str) -> str | None:
    for replica in cluster_view(server)["replicas"]:
        if agent_id in replica["agents"]:
            return str(replica["id"])
    return None


def text_of(server: ServerProcess, job_id: str) -> str:
    return server.api("GET", f"/api/v1/jobs/{job_id}/logs?format=text")


def agent_connects(agent_log: Path) -> int:
    """How many sessions the agent process has opened (it logs one line per welcome)."""
    return sum(" connected to " in line for line in agent_log.read_text(errors="replace").splitlines())


def wait_all(server: ServerProcess, job_ids: list[str], states: set[str], timeout: float) -> list[dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}

    def check() -> bool:
        for job_id in job_ids:
            if job_id not in done:
                job = server.job(job_id)
                if job["state"] in states:
                    done[job_id] = job
        return len(done) == len(job_ids)

    try:
        wait_until(check, timeout, 0.2, f"{len(job_ids)} jobs to reach {sorted(states)}")
    except AssertionError as exc:
        missing = {j: server.job(j) for j in job_ids if j not in done}
        raise AssertionError(f"{exc}; not done: {missing}") from None
    return [done[j] for j in job_ids]


@pytest.fixture
def replicas(cluster: Cluster, redis: RedisServer) -> list[ServerProcess]:
    return cluster.replicas(redis.url, 3)


# ---- tests ---------------------------------------------------------------------------------------


def test_cluster_lists_replicas_leader_epoch_and_agents(cluster: Cluster, replicas: list[ServerProcess]) -> None:
    r0, r1, r2 = replicas
    _, a1, _ = cluster.agent(r1, "a1", urls=urls_from(r1, replicas), executor="process")
    _, a2, _ = cluster.agent(r2, "a2", urls=urls_from(r2, replicas), executor="process")
    leader, epoch = leader_of(replicas)
    view = cluster_view(r0)
    assert view["this_replica"] == "rs-0"
    assert view["leader"] == rid(leader) and view["epoch"] == epoch >= 1
    listed = {r["id"]: r for r in view["replicas"]}
    assert set(listed) == {"rs-0", "rs-1", "rs-2"}
    assert [r["id"] for r in view["replicas"] if r["leader"]] == [rid(leader)]
    assert listed["rs-0"]["agents"] == [] and listed["rs-1"]["agents"] == [a1] and listed["rs-2"]["agents"] == [a2]
    assert {listed[rid(s)]["pid"] for s in replicas} == {s.pid for s in replicas}
    # Every replica gives the same answer (apart from who is asking).
    for srv in (r1, r2):
        other = cluster_view(srv)
        assert other["this_replica"] == rid(srv)
        assert (other["leader"], other["epoch"], other["replicas"]) == (view["leader"], view["epoch"], view["replicas"])


def test_job_runs_across_replicas_and_logs_reach_a_third_one_complete_and_in_order(
    cluster: Cluster, replicas: list[ServerProcess]
) -> None:
    r0, r1, r2 = replicas
    _, agent_id, _ = cluster.agent(r1, "a1", urls=urls_from(r1, replicas), executor="process", capacity=4)
    assert replica_of_agent(r0, agent_id) == "rs-1"
    script = "for i in $(seq 1 60); do echo out$i; echo err$i >&2; [ $((i % 10)) -eq 0 ] && sleep 0.05; done"
    job = r0.submit(image=IMAGE, command=script)  # submitted to replica 0
    sub = Subscriber(r2.ws_url, r2.admin_key, f"job:{job['id']}", from_offset=0)  # watched on replica 2
    try:
        done = r2.wait_state(job["id"], {"succeeded", "failed"})
        assert done["state"] == "succeeded" and done["agent_id"] == agent_id  # ran on replica 1's agent
        assert (done["attempt"], done["runs"]) == (1, 1)
        entries = r1.logs(job["id"])
        assert [e["offset"] for e in entries] == list(range(len(entries)))
        out = "".join(e["text"] for e in entries if e["stream"] == "stdout").splitlines()
        err = "".join(e["text"] for e in entries if e["stream"] == "stderr").splitlines()
        assert out == [f"out{i}" for i in range(1, 61)] and err == [f"err{i}" for i in range(1, 61)]
        sub.wait_for(lambda s: len(s.logs()) >= len(entries) and "succeeded" in s.states(), what="all logs")
        assert [(x["offset"], x["stream"], x["text"]) for x in sub.logs()] == [
            (e["offset"], e["stream"], e["text"]) for e in entries
        ]
    finally:
        sub.close()
    # More jobs, one submitted to each replica: all run on the agent of replica 1.
    jobs = [srv.submit(image=IMAGE, command=f"echo from-{rid(srv)}") for srv in replicas]
    for srv, j in zip(replicas, wait_all(r2, [j["id"] for j in jobs], {"succeeded", "failed"}, 30), strict=True):
        assert j["state"] == "succeeded" and j["agent_id"] == agent_id
        assert text_of(r0, j["id"]) == f"from-{rid(srv)}\n"


def test_cancel_sent_to_one_replica_reaches_an_agent_on_another(cluster: Cluster, replicas: list[ServerProcess]) -> None:
    r0, r1, _ = replicas
    _, agent_id, _ = cluster.agent(r1, "a1", urls=urls_from(r1, replicas), executor="process")
    job = r0.submit(image=IMAGE, command="echo started; sleep 600")
    r0.wait_state(job["id"], "running")
    wait_until(lambda: "started" in text_of(r0, job["id"]), 10, what="the job's first output")
    before = exact_metric(r1, CANCEL_ACK)
    assert replica_of_agent(r0, agent_id) == "rs-1"
    cancelled = r0.api("POST", f"/api/v1/jobs/{job['id']}/cancel")  # cancel sent to replica 0
    assert cancelled["state"] in {"cancelling", "cancelled"}
    done = r0.wait_state(job["id"], {"cancelled", "failed", "succeeded"}, timeout=20)
    assert done["state"] == "cancelled" and done["attempt"] == 1
    # The cancel-ack came in on replica 1, where the agent's socket is.
    assert exact_metric(r1, CANCEL_ACK) == before + 1


def test_kill_9_of_the_leader_fails_over_without_rerunning_jobs(cluster: Cluster, replicas: list[ServerProcess]) -> None:
    leader, epoch = leader_of(replicas)
    others = [s for s in replicas if s is not leader]
    _, on_leader, _ = cluster.agent(leader, "a-lead", urls=urls_from(leader, replicas), executor="process", capacity=3)
    _, elsewhere, _ = cluster.agent(others[0], "a-other", urls=urls_from(others[0], replicas), executor="process")
    assert replica_of_agent(others[1], on_leader) == rid(leader)
    # Jobs that are running when the replica dies; at least one of them on the dead replica's agent.
    long_jobs = [others[0].submit(image=IMAGE, command=f"echo begin-{i}; sleep 4; echo end-{i}") for i in range(4)]
    wait_all(others[0], [j["id"] for j in long_jobs], {"running"}, 20)
    on_dead = [j["id"] for j in long_jobs if others[0].job(j["id"])["agent_id"] == on_leader]
    assert on_dead, "some job must run on the agent of the replica that dies"
    for job_id in on_dead:
        wait_until(lambda job_id=job_id: "begin" in text_of(others[0], job_id), 10, what="first output")

    killed_at = time.monotonic()
    leader.stop(signal.SIGKILL)
    new_leader, new_epoch = wait_until(
        lambda: (lambda v: v and v["leader"] != rid(leader) and (v["leader"], v["epoch"]))(_leader_view(others)),
        10,
        0.02,
        "another replica to take the scheduler lock",
    )
    failover_s = time.monotonic() - killed_at
    print(f"\nFAILOVER: kill -9 of the leader -> new leader {new_leader} (epoch {epoch} -> {new_epoch}) "
          f"in {failover_s:.2f} s (lock TTL {LOCK_TTL_S} s + renew {RENEW_S} s = {LOCK_TTL_S + RENEW_S} s)")
    assert new_epoch > epoch
    assert failover_s < 10

    # The dead replica's agent reconnects to one of the others and keeps its running jobs.
    wait_until(lambda: replica_of_agent(others[0], on_leader) in {rid(s) for s in others}, 15, 0.05,
               "the agent of the dead replica to reconnect elsewhere")
    print(f"RECONNECT: the dead replica's agent was back on another replica {time.monotonic() - killed_at:.2f} s "
          "after the kill (checked once the new leader was found)")
    view = cluster_view(others[1])
    assert rid(leader) not in {r["id"] for r in view["replicas"] if r["agents"]}

    # Queued jobs keep flowing through the survivors.
    more = [others[i % 2].submit(image=IMAGE, command=f"echo more-{i}") for i in range(6)]
    for j in wait_all(others[1], [j["id"] for j in more], {"succeeded", "failed", "lost"}, 30):
        assert j["state"] == "succeeded", j
        assert text_of(others[0], j["id"]) == f"{j['spec']['command'].split()[-1]}\n"

    for j in wait_all(others[1], [j["id"] for j in long_jobs], {"succeeded", "failed", "lost"}, 30):
        i = long_jobs.index(next(x for x in long_jobs if x["id"] == j["id"]))
        assert j["state"] == "succeeded", j
        assert (j["attempt"], j["runs"]) == (1, 1), j  # not re-run
        assert text_of(others[1], j["id"]) == f"begin-{i}\nend-{i}\n"
    assert {elsewhere, on_leader} >= {j["agent_id"] for j in map(others[0].job, on_dead)}


def test_sigstop_of_the_leader_longer_than_its_ttl_makes_it_step_down(
    cluster: Cluster, replicas: list[ServerProcess]
) -> None:
    leader, epoch = leader_of(replicas)
    others = [s for s in replicas if s is not leader]
    # Agents on the two other replicas only, so that every job can run while the leader is frozen.
    for i, srv in enumerate(others):
        cluster.agent(srv, f"a{i}", urls=[srv.url] + [s.url for s in others if s is not srv], executor="process",
                      capacity=3)
    first = [leader.submit(image=IMAGE, command=f"echo job-{i}") for i in range(5)]
    wait_all(others[0], [j["id"] for j in first], {"succeeded"}, 30)

    leader.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # A stream of jobs while the leader is frozen (it may be frozen in the middle of a pass).
        during: list[dict[str, Any]] = []
        while time.monotonic() - stopped_at < 5.0:
            during.append(others[len(during) % 2].submit(image=IMAGE, command=f"echo job-{len(first) + len(during)}"))
            time.sleep(0.25)
        new_leader, new_epoch = leader_of(others)
        assert new_leader is not leader and new_epoch > epoch
    finally:
        leader.send_signal(signal.SIGCONT)
    resumed_at = time.time()
    after = [others[0].submit(image=IMAGE, command=f"echo job-{len(first) + len(during) + i}") for i in range(5)]
    all_jobs = first + during + after

    # The old leader finds its lock gone and steps down; nobody else took over from the new one.
    wait_until(lambda: exact_metric(leader, "yardmaster_scheduler_is_leader") == 0.0, 10, 0.05,
               "the resumed old leader to step down")
    latest, latest_epoch = leader_of(replicas)
    assert latest is new_leader and latest_epoch == new_epoch
    done = wait_all(leader, [j["id"] for j in all_jobs], {"succeeded", "failed", "lost", "cancelled"}, 40)
    for i, j in enumerate(done):
        assert j["state"] == "succeeded", j
        # Each run printed its line once; only the current attempt's result was accepted.
        assert text_of(leader, j["id"]) == f"job-{i}\n" * j["runs"], j
        assert j["runs"] == 1 and j["attempt"] == 1, j

    # The Store's history (read-only, after the fact): no change fenced with the old epoch was made
    # after the old leader woke up, and no job has logs of an attempt it never reached.
    db = sqlite3.connect(f"file:{leader.data_dir / 'yardmaster.db'}?mode=ro", uri=True)
    try:
        stale = db.execute(
            "SELECT id FROM jobs WHERE json_extract(doc, '$.epoch') = ? AND json_extract(doc, '$.updated_at') > ?",
            (epoch, resumed_at),
        ).fetchall()
        dup = db.execute(
            "SELECT l.job_id, l.attempt FROM logs l JOIN jobs j ON j.id = l.job_id"
            " WHERE l.attempt > json_extract(j.doc, '$.attempt') OR l.attempt < 1 GROUP BY l.job_id, l.attempt"
        ).fetchall()
    finally:
        db.close()
    assert stale == [] and dup == []


def test_redis_restart_mid_stream_loses_nothing_and_agent_sockets_stay_open(
    cluster: Cluster, replicas: list[ServerProcess], redis: RedisServer
) -> None:
    r0, r1, r2 = replicas
    agents = [
        cluster.agent(srv, f"a{i}", urls=urls_from(srv, replicas), executor="process", capacity=3)
        for i, srv in enumerate((r1, r2))
    ]
    sessions = {proc.name: agent_connects(proc.log_path) for proc, _, _ in agents}
    assert all(n == 1 for n in sessions.values()), sessions
    # A browser following every job's state on replica 0 from before the outage.
    watcher = Subscriber(r0.ws_url, r0.admin_key, "jobs", from_offset=None)
    watcher.wait_for(lambda s: any(m["type"] == "subscribed" for m in s.messages), 10, "subscribed")

    jobs: list[dict[str, Any]] = []
    saw_503 = False
    stopped = False
    for i in range(20):
        if i == 7:
            redis.stop()
            stopped = True
            with pytest.raises(HttpError) as err:
                http("GET", f"{r0.url}/readyz")
            assert err.value.status == 503 and "redis" in str(err.value.body), err.value.body
            saw_503 = True
        if i == 14:
            redis.start()  # same port, same dir: AOF brings the data back
            stopped = False
        try:
            jobs.append(replicas[i % 3].submit(image=IMAGE, command=f"echo job-{i}"))
        except HttpError as exc:  # while Redis is down a submit may be refused; it never half-happens
            assert exc.status == 503, exc
        time.sleep(0.15)
    assert saw_503 and not stopped
    wait_until(lambda: http("GET", f"{r0.url}/readyz")["status"] == "ready", 15, 0.1, "readyz after Redis")
    assert len(jobs) >= 13, len(jobs)  # at least those submitted while Redis was up
    done = wait_all(r0, [j["id"] for j in jobs], {"succeeded", "failed", "lost", "cancelled"}, 60)
    for j in done:
        n = int(j["spec"]["command"].split("-")[-1])
        assert j["state"] == "succeeded", j
        # A job whose job-assign was published while Redis was down is re-queued when its
        # assignment lease (YM_ASSIGN_ACK_S) expires and runs as attempt 2 with runs still 1:
        # the output is there once per run, and there is only one run.
        assert j["runs"] == 1, j
        assert text_of(r1, j["id"]) == f"job-{n}\n", j
    # The agents' WebSockets stayed open through the outage: no agent opened a second session.
    assert {proc.name: agent_connects(proc.log_path) for proc, _, _ in agents} == sessions

    # Pub/sub came back on every replica: the browser's subscription (made before the outage)
    # sees new jobs' states, and a cancel sent to replica 0 reaches an agent held by another.
    probe = r1.submit(image=IMAGE, command="echo probe")
    watcher.wait_for(lambda s: any(m.get("job_id") == probe["id"] and m.get("state") == "succeeded"
                                   for m in s.messages), 15, "the probe job's state on the old subscription")
    watcher.close()
    long = r2.submit(image=IMAGE, command="echo started; sleep 600")
    running = r2.wait_state(long["id"], "running")
    holder = next(srv for srv in replicas if srv is not r0 and replica_of_agent(r0, running["agent_id"]) == rid(srv))
    wait_until(lambda: "started" in text_of(r0, long["id"]), 10, what="the long job's output")
    acks = exact_metric(holder, CANCEL_ACK)
    r0.api("POST", f"/api/v1/jobs/{long['id']}/cancel")
    assert r0.wait_state(long["id"], {"cancelled", "failed", "succeeded"}, timeout=20)["state"] == "cancelled"
    assert exact_metric(holder, CANCEL_ACK) == acks + 1


def test_sigterm_of_a_replica_sends_its_agents_elsewhere_with_1012_and_hands_over_the_lock(
    cluster: Cluster, replicas: list[ServerProcess]
) -> None:
    leader, epoch = leader_of(replicas)
    others = [s for s in replicas if s is not leader]
    proc, agent_id, _ = cluster.agent(leader, "a1", urls=urls_from(leader, replicas), executor="process")
    job = others[0].submit(image=IMAGE, command="echo begin; sleep 3; echo end")
    others[0].wait_state(job["id"], "running")
    watcher = Subscriber(leader.ws_url, leader.admin_key, f"job:{job['id']}", from_offset=0)
    watcher.wait_for(lambda s: any(m["type"] == "subscribed" for m in s.messages), 10, "subscribed")

    started = time.monotonic()
    rc = leader.stop(signal.SIGTERM, timeout=15)
    stop_s = time.monotonic() - started
    new_leader, new_epoch = leader_of(others)
    handover_s = time.monotonic() - started
    print(f"\nSIGTERM: replica stopped in {stop_s:.2f} s; new leader {rid(new_leader)} "
          f"(epoch {epoch} -> {new_epoch}) {handover_s:.2f} s after the signal")
    assert rc in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    assert "Application shutdown complete" in leader.log_path.read_text()
    assert stop_s < 5  # open WebSockets did not hold it up to uvicorn's 10 s graceful timeout
    watcher.wait_for(lambda s: s.close_code is not None, 5, "the browser socket to close")
    assert watcher.close_code == 1012
    assert new_epoch > epoch
    # The lock was released, not left to expire (TTL 2 s); the others poll every 0.5 s.
    assert handover_s - stop_s < LOCK_TTL_S
    log = proc.log_path.read_text(errors="replace")
    assert "is restarting; reconnecting to the next one" in log, log  # close 1012
    wait_until(lambda: replica_of_agent(others[0], agent_id) in {rid(s) for s in others}, 10, 0.1,
               "the agent to reconnect to another replica")
    done = others[1].wait_state(job["id"], {"succeeded", "failed", "lost"}, timeout=20)
    assert done["state"] == "succeeded" and (done["attempt"], done["runs"]) == (1, 1), done
    assert text_of(others[1], job["id"]) == "begin\nend\n"
