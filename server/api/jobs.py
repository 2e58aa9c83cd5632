"""/api/v1/jobs: submit, list, inspect, cancel, read logs."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from yardmaster.protocol.jobs import JOB_STATES, JobSpec, decode_spec_request, validation_field
from yardmaster.server.api.auth import client_address, read_body, requires, runtime
from yardmaster.server.security.rate_limits import SUBMIT
from yardmaster.server.api.errors import ApiError
from yardmaster.server.api.views import job_view
from yardmaster.server.backends.records import JobRecord
from yardmaster.server.core.admission import AdmissionRefused
from yardmaster.server.core.jobs import JobAlreadyFinished
from yardmaster.server.runtime import Runtime
from yardmaster.server.security.principals import Principal

MAX_PAGE = 1000
MAX_BATCH = 1000  # specs in one batch submit

_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_json = msgspec.json.Encoder()


def int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, "invalid-parameter", f"{name} must be an integer", field=name) from None
    if not lo <= value <= hi:
        raise ApiError(422, "invalid-parameter", f"{name} must be between {lo} and {hi}", field=name)
    return value


async def visible_job(request: Request, principal: Principal) -> JobRecord:
    job = await runtime(request).jobs.find(request.path_params["job_id"])
    if job is None or not principal.may_see(job.owner):
        raise ApiError(404, "not-found", "no such job")
    return job


def decode_spec(body: bytes, index: int | None = None) -> JobSpec:
    """One spec of the request; `index` is its position in a batch (named in the error)."""
    try:
        return decode_spec_request(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        field = validation_field(exc) if isinstance(exc, msgspec.ValidationError) else None
        message = str(exc)
        if index is not None:
            field = f"[{index}].{field}" if field else f"[{index}]"
            where = f"`$[{index}]"
            message = message.replace("`$", where, 1) if "`$" in message else f"{message} - at {where}`"
        raise ApiError(422, "invalid-spec", message, field=field) from None


def decode_batch(body: bytes) -> list[JobSpec]:
    """A batch submit: a JSON array of 1 to MAX_BATCH specs, every one valid."""
    try:
        items = _batch_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ApiError(422, "invalid-spec", str(exc)) from None
    if not items:
        raise ApiError(422, "invalid-spec", "a batch holds at least 1 job")
    if len(items) > MAX_BATCH:
        raise ApiError(422, "invalid-spec", f"at most {MAX_BATCH} jobs in one submit", field=f"[{MAX_BATCH}]")
    return [decode_spec(bytes(raw), i) for i, raw in enumerate(items)]


@requires("jobs:write", rate=SUBMIT)  # a batch is one request
async def submit_job(request: Request, principal: Principal) -> Response:
    """One spec (a JSON object) or a batch (a JSON array of specs: all stored, or none)."""
    rt = runtime(request)
    body = await read_body(request, rt.settings.max_request_body_bytes)
    if body.lstrip()[:1] == b"[":
        return await submit_batch(rt, principal, decode_batch(body))
    spec = decode_spec(body)
    try:
        job = await rt.jobs.submit(spec, principal.id)
    except AdmissionRefused as exc:
        raise ApiError(422, "not-allowed", exc.message, field=exc.field) from None
    return JSONResponse(job_view(job, principal), status_code=201, headers={"Location": f"/api/v1/jobs/{job.id}"})


async def submit_batch(rt: Runtime, principal: Principal, specs: list[JobSpec]) -> Response:
    try:
        jobs = await rt.jobs.submit_many(specs, principal.id)
    except AdmissionRefused as exc:
        raise ApiError(422, "not-allowed", exc.message, field=exc.field) from None
    # In submission order; env values shown as to a single submit's submitter.
    body = _json.encode({"jobs": [job_view(job, principal) for job in jobs]})
    return Response(body, status_code=201, media_type="application/json")


@requires("jobs:read")
async def list_jobs(request: Request, principal: Principal) -> Response:
    states = request.query_params.getlist("state")
    for state in states:
        if state not in JOB_STATES:
            raise ApiError(422, "invalid-parameter", f"unknown state {state[:32]!r}", field="state")
    limit = int_param(request, "limit", 50, 1, MAX_PAGE)
    jobs = await runtime(request).jobs.list_jobs(
        owner=None if principal.is_admin else principal.id,
        states=states,
        limit=limit,
        before=request.query_params.get("before"),
    )
    # A listing never shows env values, not even to the submitter: it is the view most often
    # pasted and logged; GET /api/v1/jobs/{id} shows them to the submitter.
    return JSONResponse(
        {"jobs": [job_view(j) for j in jobs], "next": jobs[-1].id if len(jobs) == limit else None}
    )


@requires("jobs:read")
async def get_job(request: Request, principal: Principal) -> Response:
    return JSONResponse(job_view(await visible_job(request, principal), principal))


@requires("jobs:write")
async def cancel_job(request: Request, principal: Principal) -> Response:
    rt = runtime(request)
    job = await visible_job(request, principal)
    try:
        job = await rt.jobs.cancel(job.id, reason=f"cancelled by {principal.id}")
    except JobAlreadyFinished as exc:
        raise ApiError(409, "already-finished", f"job is already {exc.job.state}") from None
    if job.owner != principal.id:  # only an admin sees, so cancels, another user's job
        await rt.audit.record(
            "job.cancelled-by-admin",
            actor=principal.id,
            target=job.id,
            client_address=client_address(request),
            details={"owner": job.owner},
        )
    return JSONResponse(job_view(job, principal), status_code=202)


@requires("jobs:read")
async def job_logs(request: Request, principal: Principal) -> Response:
    job = await visible_job(request, principal)
    from_offset = int_param(request, "from_offset", 0, 0, 2**62)
    limit = int_param(request, "limit", MAX_PAGE, 1, 10_000)
    page = await runtime(request).jobs.logs(job.id, from_offset, limit)
    if request.query_params.get("format") == "text":
        parts: list[bytes] = []
        gap_ends = {end for _, end in page.gaps}
        for e in page.entries:
            if e.offset in gap_ends:
                parts.append(f"\n[yardmaster: {page.dropped_bytes} bytes of output dropped here (per-job log cap)]\n".encode())
            parts.append(e.data)
        text = b"".join(parts).decode("utf-8", errors="replace")
        return PlainTextResponse(text, headers={"X-Next-Offset": str(page.next_offset)})
    return JSONResponse(
        {
            "entries": [
                {
                    "offset": e.offset,
                    "attempt": e.attempt,
                    "stream": e.stream,
                    "text": e.data.decode("utf-8", errors="replace"),
                    "ts": e.ts,
                }
                for e in page.entries
            ],
            "next_offset": page.next_offset,
            # Ranges the log cap dropped: [from_offset, to_offset) has no entries any more.
            "truncated": [{"from_offset": a, "to_offset": b} for a, b in page.gaps],
        }
    )


routes = [
    Route("/api/v1/jobs", submit_job, methods=["POST"]),
    Route("/api/v1/jobs", list_jobs, methods=["GET"]),
    Route("/api/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/api/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/api/v1/jobs/{job_id}/logs", job_logs, methods=["GET"]),
]
