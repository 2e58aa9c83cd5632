"""Every wire message of both WebSocket channels as a msgspec Struct.

Each channel direction is a tagged union; the tag field is `type` and its values are the
kebab-case message names. Agent messages do not forbid unknown fields, so that a newer agent
can talk to an older server: new fields are added with defaults, existing ones never retyped.
"""

from __future__ import annotations

from typing import Literal, Union

import msgspec

from yardmaster.protocol.jobs import FinalState, JobSpec, JobState

Stream = Literal["stdout", "stderr"]


class _Msg(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    pass


# ---- shared -----------------------------------------------------------------------------------


class Error(_Msg, tag="error"):
    """A refused or broken message. `code` is stable and machine-readable."""

    code: str
    message: str = ""
    job_id: str | None = None
    attempt: int | None = None


# Error codes used on both channels.
ERR_MALFORMED = "malformed"
ERR_UNKNOWN_TYPE = "unknown-type"
ERR_TOO_BIG = "too-big"
ERR_STALE_ATTEMPT = "stale-attempt"
ERR_UNKNOWN_JOB = "unknown-job"
ERR_SEQ_GAP = "seq-gap"
ERR_FORBIDDEN = "forbidden"
ERR_BAD_TOPIC = "bad-topic"
ERR_INTERNAL = "internal"
ERR_UNEXPECTED = "unexpected-message"
ERR_RATE_LIMITED = "rate-limited"  # client channel: over the socket's message rate
ERR_QUOTA_EXCEEDED = "quota-exceeded"  # client channel: over the subscriptions per socket


# ---- agent channel: agent -> server ------------------------------------------------------------


class RunningJob(msgspec.Struct, kw_only=True, omit_defaults=True):
    job_id: str
    attempt: int
    last_seq: int = -1  # highest log seq the agent has produced for this attempt


class Hello(_Msg, tag="hello"):
    name: str
    version: str
    labels: list[str] = []
    capacity: int = 1
    executor: str = "docker"
    executor_info: dict[str, str] = {}
    running: list[RunningJob] = []
    agent_id: str | None = None  # informative; the token decides who the agent is


class Heartbeat(_Msg, tag="heartbeat"):
    running: list[RunningJob] = []


class JobAccept(_Msg, tag="job-accept"):
    job_id: str
    attempt: int


class JobReject(_Msg, tag="job-reject"):
    job_id: str
    attempt: int
    reason: str = ""


class LogChunk(_Msg, tag="log-chunk"):
    job_id: str
    attempt: int
    seq: int
    stream: Stream
    data: bytes
    ts: float


class Result(_Msg, tag="result"):
    job_id: str
    attempt: int
    state: FinalState
    exit_code: int | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    last_seq: int = -1  # highest log seq of this attempt, so the server knows when logs are complete


class CancelAck(_Msg, tag="cancel-ack"):
    job_id: str
    attempt: int


AgentToServer = Union[Hello, Heartbeat, JobAccept, JobReject, LogChunk, Result, CancelAck, Error]


# ---- agent channel: server -> agent ------------------------------------------------------------


class ResumeJob(msgspec.Struct, kw_only=True, omit_defaults=True):
    job_id: str
    attempt: int
    acked_seq: int = -1  # highest contiguous seq stored; re-send from acked_seq + 1
    keep: bool = True  # False: the job is no longer this agent's, stop it and drop its buffer


class Welcome(_Msg, tag="welcome"):
    session_id: str
    agent_id: str
    heartbeat_interval_s: float
    lease_s: float
    resume: list[ResumeJob] = []
    # What the server granted: the registration decides (see the README, "Agent labels").
    # None from a server that predates them.
    labels: list[str] | None = None
    capacity: int | None = None


class JobAssign(_Msg, tag="job-assign"):
    job_id: str
    attempt: int
    spec: JobSpec
    deadline: float  # unix time by which the job must be finished (timeout)


class LogAck(_Msg, tag="log-ack"):
    job_id: str
    attempt: int
    seq: int  # highest contiguous seq stored


class ResultAck(_Msg, tag="result-ack"):
    job_id: str
    attempt: int
    accepted: bool = True


class Cancel(_Msg, tag="cancel"):
    job_id: str
    attempt: int
    reason: str = "cancelled"
    grace_s: float = 10.0


class Drain(_Msg, tag="drain"):
    reason: str = ""


ServerToAgent = Union[Welcome, JobAssign, LogAck, ResultAck, Cancel, Drain, Error]


# ---- client channel: client -> server ----------------------------------------------------------


class Subscribe(_Msg, tag="subscribe"):
    topic: str  # "job:<id>" or "jobs"
    from_offset: int | None = None  # None: live only


class Unsubscribe(_Msg, tag="unsubscribe"):
    topic: str


class Ping(_Msg, tag="ping"):
    id: str | None = None


ClientToServer = Union[Subscribe, Unsubscribe, Ping]


# ---- client channel: server -> client ----------------------------------------------------------


class Subscribed(_Msg, tag="subscribed"):
    topic: str
    next_offset: int | None = None  # for job topics: the offset the next stored log entry gets


class Unsubscribed(_Msg, tag="unsubscribed"):
    topic: str


class Log(_Msg, tag="log"):
    job_id: str
    attempt: int
    offset: int
    stream: Stream
    text: str


class JobStateMsg(_Msg, tag="job-state"):
    job_id: str
    state: JobState
    attempt: int
    exit_code: int | None = None
    error: str | None = None
    agent_id: str | None = None


class Truncated(_Msg, tag="truncated"):
    job_id: str
    offset: int  # history before this offset is gone


class Pong(_Msg, tag="pong"):
    id: str | None = None


ServerToClient = Union[Subscribed, Unsubscribed, Log, JobStateMsg, Truncated, Pong, Error]

AGENT_TO_SERVER_TAGS = frozenset(t.__struct_config__.tag for t in AgentToServer.__args__)  # type: ignore[attr-defined]
SERVER_TO_AGENT_TAGS = frozenset(t.__struct_config__.tag for t in ServerToAgent.__args__)  # type: ignore[attr-defined]
CLIENT_TO_SERVER_TAGS = frozenset(t.__struct_config__.tag for t in ClientToServer.__args__)  # type: ignore[attr-defined]
SERVER_TO_CLIENT_TAGS = frozenset(t.__struct_config__.tag for t in ServerToClient.__args__)  # type: ignore[attr-defined]


def tag_of(msg: msgspec.Struct) -> str:
    """The wire name of a message (`job-assign`), also used as the metric label."""
    return str(type(msg).__struct_config__.tag)
