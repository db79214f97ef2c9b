"""HTTP basic auth in front of the dashboard, for ``outbox web`` (a mounted app uses its host's).

Credentials are ``user:password`` lines (``OUTBOX_WEB_AUTH``, or the file ``--auth-file`` names). A
request without them, or with a wrong user or password, gets 401 and a ``WWW-Authenticate`` challenge;
passwords are compared with :func:`hmac.compare_digest`, in time that does not depend on where they
differ. The user let through is the request's ``scope["user"]`` (a ``SimpleUser``), as Starlette's
authentication middleware would set it: the dashboard's audit lines name them.
-- ``tests/test_web.py::test_basic_auth``
"""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.authentication import SimpleUser
from starlette.types import ASGIApp, Receive, Scope, Send

from outbox._errors import ConfigError


def parse_credentials(text: str, where: str) -> dict[str, str]:
    """``{user: password}`` from ``user:password`` lines (blank lines and ``#`` comments skipped);
    :class:`ConfigError` naming ``where`` for a line without a user or a password."""
    found: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user or not password:
            raise ConfigError(f"{where}, line {number}: expected user:password")
        found[user] = password
    if not found:
        raise ConfigError(f"{where}: no user:password in it")
    return found


class BasicAuth:
    """ASGI middleware: only requests with one of ``credentials``' user and password get through."""

    def __init__(self, app: ASGIApp, credentials: dict[str, str], realm: str = "outbox") -> None:
        self.app = app
        self.credentials = {user.encode(): password.encode() for user, password in credentials.items()}
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'.encode()

    def user(self, header: bytes | None) -> str | None:
        """The user ``header`` authenticates, or ``None``."""
        if not header or header[:6].lower() != b"basic ":
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        user, _, password = decoded.partition(b":")
        expected = self.credentials.get(user)
        # compared even for an unknown user, so that the answer's timing does not tell users apart
        matches = hmac.compare_digest(password, expected if expected is not None else b"\0" + password)
        return user.decode("utf-8", "replace") if matches and expected is not None else None

    def allowed(self, header: bytes | None) -> bool:
        return self.user(header) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        user = self.user(dict(scope.get("headers", [])).get(b"authorization"))
        if user is not None:
            # as Starlette's AuthenticationMiddleware does: request.user names who runs an action (audit)
            await self.app({**scope, "user": SimpleUser(user)}, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"www-authenticate", self.challenge),
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"x-content-type-options", b"nosniff"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"authentication required\n"})
