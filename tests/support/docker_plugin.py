"""pytest plugin: a session-scoped real Docker engine and the `docker` mark.

Tests marked `@pytest.mark.docker` get the engine started before they run (and are skipped,
or failed when CI=true, if none can be had). The `docker_engine` fixture returns it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.docker_engine import DockerEngine, EngineUnavailable


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: needs a Docker engine")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("docker") is not None and "docker_engine" not in getattr(item, "fixturenames", []):
            item.fixturenames.append("docker_engine")  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    engine = DockerEngine()
    try:
        engine.start()
    except EngineUnavailable as exc:
        reason = f"no Docker engine: {exc}"
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        print(reason)
        pytest.skip(reason)
    try:
        yield engine
    finally:
        engine.stop()
