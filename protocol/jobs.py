"""Job specs, job states and the one transition function that knows which moves are legal."""

from __future__ import annotations

import enum
import re
from typing import Annotated, Literal

import msgspec

JOB_STATES = (
    "queued",
    "assigned",
    "running",
    "cancelling",
    "succeeded",
    "failed",
    "cancelled",
    "timed-out",
    "lost",
)
JobState = Literal[
    "queued", "assigned", "running", "cancelling", "succeeded", "failed", "cancelled", "timed-out", "lost"
]
FinalState = Literal["succeeded", "failed", "cancelled", "timed-out"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "timed-out", "lost"})
# States in which a job holds a lease on an agent.
LEASED_STATES: frozenset[str] = frozenset({"assigned", "running", "cancelling"})


class JobEvent(enum.Enum):
    ASSIGN = "assign"  # scheduler claimed the job for an agent (new attempt)
    ACCEPT = "accept"  # agent said job-accept
    REJECT = "reject"  # agent said job-reject, or never answered the job-assign
    LEASE_LOST_RETRY = "lease-lost-retry"  # agent lost; attempts remain
    LEASE_LOST_FINAL = "lease-lost-final"  # agent lost; attempts exhausted
    CANCEL = "cancel"  # a user asked to cancel
    CANCELLED = "cancelled"  # the agent confirmed the stop (cancel-ack / result cancelled)
    SUCCEED = "succeed"
    FAIL = "fail"
    TIME_OUT = "time-out"


class IllegalTransition(ValueError):
    def __init__(self, state: str, event: JobEvent) -> None:
        super().__init__(f"job in state {state!r} cannot take event {event.value!r}")
        self.state = state
        self.event = event


_FINISH = {JobEvent.SUCCEED: "succeeded", JobEvent.FAIL: "failed", JobEvent.TIME_OUT: "timed-out"}

_TRANSITIONS: dict[tuple[str, JobEvent], str] = {
    ("queued", JobEvent.ASSIGN): "assigned",
    ("queued", JobEvent.CANCEL): "cancelled",
    ("assigned", JobEvent.ACCEPT): "running",
    ("assigned", JobEvent.REJECT): "queued",
    ("assigned", JobEvent.LEASE_LOST_RETRY): "queued",
    ("assigned", JobEvent.LEASE_LOST_FINAL): "lost",
    ("assigned", JobEvent.CANCEL): "cancelling",
    ("running", JobEvent.LEASE_LOST_RETRY): "queued",
    ("running", JobEvent.LEASE_LOST_FINAL): "lost",
    ("running", JobEvent.CANCEL): "cancelling",
    ("running", JobEvent.CANCELLED): "cancelled",
    ("cancelling", JobEvent.CANCELLED): "cancelled",
    # A cancelled job whose agent is gone will never confirm: it is cancelled all the same.
    ("cancelling", JobEvent.LEASE_LOST_RETRY): "cancelled",
    ("cancelling", JobEvent.LEASE_LOST_FINAL): "cancelled",
    # An agent that had not yet accepted (or whose accept crossed the cancel) confirms directly.
    ("assigned", JobEvent.CANCELLED): "cancelled",
}
for _event, _final in _FINISH.items():
    _TRANSITIONS[("running", _event)] = _final
    # The job may finish on its own before the stop signal reaches it; the real outcome wins.
    _TRANSITIONS[("cancelling", _event)] = _final
    # A very short job can report its result before the server processed its job-accept.
    _TRANSITIONS[("assigned", _event)] = _final


def transition(state: str, event: JobEvent) -> str:
    """Return the state after `event`, or raise IllegalTransition."""
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def can_transition(state: str, event: JobEvent) -> bool:
    return (state, event) in _TRANSITIONS


def sources_of(event: JobEvent) -> frozenset[str]:
    """Every state from which `event` is legal: what a compare-and-set update expects."""
    return frozenset(s for (s, e) in _TRANSITIONS if e is event)


def result_event(state: FinalState) -> JobEvent:
    """The event that an agent's reported final state stands for."""
    return {
        "succeeded": JobEvent.SUCCEED,
        "failed": JobEvent.FAIL,
        "cancelled": JobEvent.CANCELLED,
        "timed-out": JobEvent.TIME_OUT,
    }[state]


# ---- specs -----------------------------------------------------------------------------------

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_LABEL = r"^[A-Za-z0-9][A-Za-z0-9_.:/=-]{0,127}\Z"

Label = Annotated[str, msgspec.Meta(pattern=_LABEL)]
Priority = Annotated[int, msgspec.Meta(ge=-1000, le=1000)]


class Resources(msgspec.Struct, kw_only=True, frozen=True):
    cpus: Annotated[float, msgspec.Meta(gt=0, le=256)] = 1.0
    memory_mb: Annotated[int, msgspec.Meta(ge=6, le=1_048_576)] = 512
    pids: Annotated[int, msgspec.Meta(ge=8, le=65_536)] = 256


class JobSpec(msgspec.Struct, kw_only=True):
    """What to run. Unknown fields are ignored on the agent wire (forward compatibility);
    the HTTP API decodes `JobSpecRequest`, which refuses them."""

    image: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    command: list[Annotated[str, msgspec.Meta(max_length=65_536)]] | Annotated[
        str, msgspec.Meta(min_length=1, max_length=65_536)
    ]
    env: dict[str, Annotated[str, msgspec.Meta(max_length=65_536)]] = {}
    workdir: Annotated[str, msgspec.Meta(pattern=r"^/", max_length=4096)] | None = None
    timeout_s: Annotated[int, msgspec.Meta(ge=1, le=7 * 86_400)] = 3600
    resources: Resources = Resources()
    network: Literal["none"] = "none"
    labels: list[Label] = []
    priority: Priority = 0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    # Hardening is on by default; these are the explicit, validated ways to loosen it.
    user: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,10}(:[0-9]{1,10})?\Z")] = "65534:65534"
    read_only_rootfs: bool = True
    # "process" runs unsandboxed on a `--executor process` agent: only a job that asks for it
    # is placed there, and such an agent takes no other job.
    executor: Literal["docker", "process"] = "docker"

    def __post_init__(self) -> None:
        if isinstance(self.command, list) and not self.command:
            raise ValueError("command: must not be empty")
        if len(self.env) > 256:
            raise ValueError("env: at most 256 variables")
        for name in self.env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"env: invalid variable name {name[:64]!r}")
        if len(self.labels) > 64:
            raise ValueError("labels: at most 64 labels")

    def argv(self) -> list[str]:
        """The command as an argv list: a shell string runs under `sh -c`."""
        if isinstance(self.command, str):
            return ["/bin/sh", "-c", self.command]
        return list(self.command)


class JobSpecRequest(JobSpec, forbid_unknown_fields=True, kw_only=True):
    """A job spec as submitted over the HTTP API: a misspelt field is an error, not ignored."""


def decode_spec_request(body: bytes) -> JobSpec:
    """Decode and validate an API job spec. Raises msgspec.ValidationError naming the field."""
    req = msgspec.json.decode(body, type=JobSpecRequest)
    return msgspec.convert(msgspec.to_builtins(req), JobSpec)


def validation_field(exc: Exception) -> str | None:
    """The field a msgspec validation error is about (`$.resources.memory_mb` → `resources.memory_mb`)."""
    message = str(exc)
    path_match = re.search(r"at `\$\.?([^`]*)`", message)
    path = path_match.group(1) if path_match else ""
    named = re.search(r"(?:unknown|missing required) field `([^`]+)`", message)
    if named:
        return f"{path}.{named.group(1)}" if path else named.group(1)
    if path:
        return path
    own = re.match(r"^([a-z_]+):", message)
    return own.group(1) if own else None
