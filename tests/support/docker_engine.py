"""The test suite's Docker engine is the same one `scripts/dev` uses: see scripts/docker_engine.py."""

from scripts.docker_engine import TEST_IMAGE, DockerEngine, EngineUnavailable, ping

__all__ = ["TEST_IMAGE", "DockerEngine", "EngineUnavailable", "ping"]
