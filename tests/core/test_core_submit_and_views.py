"""Submission's admission policy and who sees a job's env values, in process."""

from __future__ import annotations

import pytest

from yardmaster.protocol.jobs import Resources
from yardmaster.server.api.views import job_view
from yardmaster.server.core.admission import AdmissionRefused
from yardmaster.server.core.events import state_message
from yardmaster.server.security.principals import Principal
from tests.core.conftest import Core

SUBMITTER = Principal(id="alice", role="user")
ANOTHER_ADMIN = Principal(id="admin", role="admin")


async def test_a_refused_spec_stores_and_queues_nothing(core: Core) -> None:
    for fields, field in (
        ({"user": "0:0"}, "user"),
        ({"resources": Resources(memory_mb=1_048_576)}, "resources.memory_mb"),
        ({"resources": Resources(cpus=256)}, "resources.cpus"),
    ):
        with pytest.raises(AdmissionRefused) as err:
            await core.submit(**fields)
        assert err.value.field == field
    assert await core.rt.jobs.list_jobs(owner=None) == []
    assert await core.broker.queue_depth() == 0 and core.transitions("queued") == 0


async def test_env_values_are_shown_to_the_submitter_only(core: Core) -> None:
    job = await core.submit(owner=SUBMITTER.id, env={"TOKEN": "s3cret", "MODE": "fast"})
    assert job_view(job, SUBMITTER)["spec"]["env"] == {"TOKEN": "s3cret", "MODE": "fast"}
    assert job_view(job, ANOTHER_ADMIN)["spec"]["env"] == {"TOKEN": "***", "MODE": "***"}
    # A listing (no viewer) masks for everyone, the submitter included.
    assert job_view(job)["spec"]["env"] == {"TOKEN": "***", "MODE": "***"}
    assert "s3cret" not in repr(job_view(job, ANOTHER_ADMIN))
    # The stored spec is untouched by the masking.
    assert (await core.job(job.id)).spec.env["TOKEN"] == "s3cret"


async def test_job_state_events_carry_no_spec(core: Core) -> None:
    job = await core.submit(env={"TOKEN": "s3cret"})
    assert "s3cret" not in repr(state_message(job))
