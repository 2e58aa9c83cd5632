"""Shared test support: real components started and stopped by the test suite."""
