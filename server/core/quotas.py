"""Per-user quotas: their names, the refusal, and each user's usage.

Queued jobs are counted by the Broker's queue itself (`Broker.admit_many`), running jobs by the
scheduler leader (a user at the quota has further jobs wait in the queue, never refused or
dropped), client sockets by Broker slots, subscriptions per socket by the socket.
"""

from __future__ import annotations

QUEUED_JOBS = "queued_jobs"
RUNNING_JOBS = "running_jobs"
CLIENT_SOCKETS = "client_sockets"
SUBSCRIPTIONS = "subscriptions_per_socket"
SANDBOXES = "sandboxes"

# What a refused caller is told to wait: quotas free up as jobs start or end and sockets close,
# which the server cannot predict; this is a polite polling interval.
QUOTA_RETRY_AFTER_S = 5


class QuotaExceeded(Exception):
    def __init__(self, quota: str, limit: int, retry_after_s: int = QUOTA_RETRY_AFTER_S) -> None:
        super().__init__(f"quota {quota} reached: at most {limit}")
        self.quota = quota
        self.limit = limit
        self.retry_after_s = retry_after_s
