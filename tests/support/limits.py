"""Rate limits in tests: off unless a test turns a class on. Most tests make many requests from
one address (127.0.0.1, or the TestClient's) in a burst no real client makes; the limit tests
(tests/*/test_*limits*.py) set each class they prove."""

from __future__ import annotations

from yardmaster.server.settings import RATE_CLASSES, env_name

RATES_OFF: dict[str, str] = {env_name("rate_" + c.replace("-", "_")): "0" for c in RATE_CLASSES}
