"""Presence values in the Broker: structs as JSON text, malformed ones read as absent."""

from __future__ import annotations

from yardmaster.server.core.presence import AgentPresence, ReplicaPresence, decode_presence, encode_presence


def test_presence_values_round_trip_and_encode_the_same_way_every_time() -> None:
    agent = AgentPresence(replica="rep_1", session="ses 2")  # a space no longer breaks the value
    raw = encode_presence(agent)
    assert decode_presence(raw, AgentPresence) == agent
    assert encode_presence(AgentPresence(replica="rep_1", session="ses 2")) == raw  # delete_presence(if_value=) relies on it
    replica = ReplicaPresence(host="host-a", pid=4242)
    assert decode_presence(encode_presence(replica), ReplicaPresence) == replica


def test_malformed_presence_reads_as_absent() -> None:
    assert decode_presence(None, AgentPresence) is None
    assert decode_presence("rep_1 ses_2", AgentPresence) is None  # the old space-joined form
    assert decode_presence('{"host": "h", "pid": "x"}', ReplicaPresence) is None
    assert decode_presence('{"replica": "r"}', AgentPresence) is None
