"""The admission policy: what a job spec may ask for, field by field, from a table."""

from __future__ import annotations

from typing import Any

import pytest

from yardmaster.protocol.jobs import JobSpec, Resources
from yardmaster.server.core.admission import AdmissionPolicy, AdmissionRefused, check_spec
from yardmaster.server.settings import load_settings

DEFAULT = AdmissionPolicy()
IMAGES = AdmissionPolicy(allowed_images=("registry.example.com/team/*", "busybox:1.*"))
ROOT_OK = AdmissionPolicy(allow_root=True)
SMALL = AdmissionPolicy(max_memory_mb=64, max_cpus=0.5, max_pids=32)


def spec(**fields: Any) -> JobSpec:
    fields.setdefault("image", "busybox:1.36")
    fields.setdefault("command", ["true"])
    return JobSpec(**fields)


# (policy, spec fields, the field refused or None when admitted)
CASES: list[tuple[str, AdmissionPolicy, dict[str, Any], str | None]] = [
    ("defaults admit the default spec", DEFAULT, {}, None),
    ("memory at the limit", DEFAULT, {"resources": Resources(memory_mb=8192)}, None),
    ("memory over the limit", DEFAULT, {"resources": Resources(memory_mb=8193)}, "resources.memory_mb"),
    ("the protocol's maximum memory", DEFAULT, {"resources": Resources(memory_mb=1_048_576)}, "resources.memory_mb"),
    ("cpus at the limit", DEFAULT, {"resources": Resources(cpus=8)}, None),
    ("cpus over the limit", DEFAULT, {"resources": Resources(cpus=8.5)}, "resources.cpus"),
    ("the protocol's maximum cpus", DEFAULT, {"resources": Resources(cpus=256)}, "resources.cpus"),
    ("pids at the limit", DEFAULT, {"resources": Resources(pids=4096)}, None),
    ("pids over the limit", DEFAULT, {"resources": Resources(pids=4097)}, "resources.pids"),
    ("a lowered memory limit", SMALL, {"resources": Resources(memory_mb=65)}, "resources.memory_mb"),
    ("a lowered cpu limit", SMALL, {"resources": Resources(cpus=0.6, memory_mb=64)}, "resources.cpus"),
    ("a lowered pids limit", SMALL, {"resources": Resources(pids=33, memory_mb=64, cpus=0.5)}, "resources.pids"),
    ("uid 0 with gid 0", DEFAULT, {"user": "0:0"}, "user"),
    ("uid 0 alone", DEFAULT, {"user": "0"}, "user"),
    ("uid 0 with another gid", DEFAULT, {"user": "0:1000"}, "user"),
    ("uid 0 spelt with leading zeros", DEFAULT, {"user": "000:1000"}, "user"),
    ("gid 0 with a non-root uid", DEFAULT, {"user": "1000:0"}, None),
    ("a non-root uid", DEFAULT, {"user": "1000"}, None),
    ("root when allowed", ROOT_OK, {"user": "0:0"}, None),
    ("a writable root filesystem", DEFAULT, {"read_only_rootfs": False}, None),
    ("any image without patterns", DEFAULT, {"image": "evil.example.com/x:latest"}, None),
    ("an image matching a pattern", IMAGES, {"image": "registry.example.com/team/app:1.2"}, None),
    ("an image matching another pattern", IMAGES, {"image": "busybox:1.36"}, None),
    ("an image matching no pattern", IMAGES, {"image": "evil.example.com/team/app:1.2"}, "image"),
    ("a tag outside the pattern", IMAGES, {"image": "busybox:latest"}, "image"),
    ("patterns are case-sensitive", IMAGES, {"image": "BUSYBOX:1.36"}, "image"),
    ("a pattern is matched against the whole name", IMAGES, {"image": "x/busybox:1.36"}, "image"),
]


@pytest.mark.parametrize(("policy", "fields", "refused"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_spec(policy: AdmissionPolicy, fields: dict[str, Any], refused: str | None) -> None:
    if refused is None:
        check_spec(spec(**fields), policy)
        return
    with pytest.raises(AdmissionRefused) as err:
        check_spec(spec(**fields), policy)
    assert err.value.field == refused
    assert str(err.value).startswith(f"{refused}: ")


def test_the_refusal_never_echoes_the_image_name() -> None:
    with pytest.raises(AdmissionRefused) as err:
        check_spec(spec(image="secret-registry.internal/x"), IMAGES)
    assert "secret-registry" not in str(err.value)


def test_policy_from_settings_reads_every_variable() -> None:
    settings = load_settings(
        {
            "YM_MAX_JOB_MEMORY_MB": "64",
            "YM_MAX_JOB_CPUS": "0.5",
            "YM_MAX_JOB_PIDS": "32",
            "YM_ALLOW_ROOT_JOBS": "true",
            "YM_ALLOWED_IMAGES": "busybox:*, registry.example.com/*",
        }
    )
    assert AdmissionPolicy.from_settings(settings) == AdmissionPolicy(
        max_memory_mb=64, max_cpus=0.5, max_pids=32, allow_root=True,
        allowed_images=("busybox:*", "registry.example.com/*"),
    )
    assert AdmissionPolicy.from_settings(load_settings({})) == DEFAULT
