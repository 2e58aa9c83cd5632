"""Sign-in sessions: JWT access tokens, refresh tokens, cookies. (Being built for issue 8: the
access-token and cookie paths refuse everything until they land.)"""

from __future__ import annotations

from starlette.requests import HTTPConnection

from yardmaster.server.security.principals import Principal


class SessionService:
    async def principal_for_access_token(self, token: str) -> Principal | None:
        return None

    async def principal_from_cookies(self, conn: HTTPConnection) -> Principal | None:
        return None
