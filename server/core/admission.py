"""Admission policy: what a job spec may ask for on this server. Pure: no I/O.

The spec's own types bound every field to what the protocol can carry; this policy is the
operator's narrower bound (YM_MAX_JOB_MEMORY_MB, YM_MAX_JOB_CPUS, YM_MAX_JOB_PIDS,
YM_ALLOW_ROOT_JOBS, YM_ALLOWED_IMAGES), checked once at submission.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from yardmaster.protocol.jobs import JobSpec
from yardmaster.server.settings import Settings


class AdmissionRefused(ValueError):
    """The spec asks for more than the policy allows; `field` is the dotted spec field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class AdmissionPolicy:
    max_memory_mb: int = 8192
    max_cpus: float = 8.0
    max_pids: int = 4096
    allow_root: bool = False
    allowed_images: tuple[str, ...] = ()  # glob patterns; empty: any image

    @classmethod
    def from_settings(cls, s: Settings) -> AdmissionPolicy:
        return cls(
            max_memory_mb=s.max_job_memory_mb,
            max_cpus=s.max_job_cpus,
            max_pids=s.max_job_pids,
            allow_root=s.allow_root_jobs,
            allowed_images=s.allowed_images,
        )


def uid_of(user: str) -> int:
    """The uid of a spec's `user` ("uid" or "uid:gid", digits only, as the spec's pattern says)."""
    return int(user.partition(":")[0])


def check_spec(spec: JobSpec, policy: AdmissionPolicy) -> None:
    """Raise AdmissionRefused naming the first field the policy does not allow."""
    r = spec.resources
    if r.memory_mb > policy.max_memory_mb:
        raise AdmissionRefused("resources.memory_mb", f"at most {policy.max_memory_mb} MB on this server")
    if r.cpus > policy.max_cpus:
        raise AdmissionRefused("resources.cpus", f"at most {policy.max_cpus:g} CPUs on this server")
    if r.pids > policy.max_pids:
        raise AdmissionRefused("resources.pids", f"at most {policy.max_pids} processes on this server")
    # Only uid 0 is root: gid 0 alone grants no privilege beyond group-root file bits (capabilities
    # are dropped and no-new-privileges is set), and images built for arbitrary uids rely on it.
    if not policy.allow_root and uid_of(spec.user) == 0:
        raise AdmissionRefused("user", "jobs may not run as uid 0 on this server")
    if policy.allowed_images and not any(fnmatchcase(spec.image, p) for p in policy.allowed_images):
        raise AdmissionRefused("image", "image not allowed on this server")
