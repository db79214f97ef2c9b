"""The dashboard's actions (replay, purge): who may run them, the CSRF check, the dry run and the audit line.

An action is two requests, never one:

1. ``GET /actions/<action>?...`` is the **dry run**: it changes nothing, counts what the action would
   change and shows a confirmation form naming that count ("Replay 37 messages").
2. ``POST /actions/<action>`` with that form runs it, if all of these hold, else 403 and nothing changes:
   the requester has the right (:func:`rights_of`: read-only unless the app allows actions), the form
   carries a valid CSRF token (:class:`Csrf`, bound to the user and at most :data:`TOKEN_LIFETIME` old),
   and the request does not come from another site (``Origin`` / ``Sec-Fetch-Site``).

What an action is about is either a **selection** (``ref=`` seqs or ids) or **everything a filter
matches** (status, topic, key), bounded by ``up_to``: the newest seq the dry run saw. A message written
after the dry run is never changed by its confirmation, so the count confirmed is an upper bound of what
changes (a message a relay or another operator changed in between is left alone and reported).

Every action run is logged as one line on the ``outbox.web.audit`` logger: who, from where, what
(the ids or the filter) and how many messages it changed. -- ``tests/test_web.py``
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request

from outbox._schema import Status
from outbox.admin import MessageFilter
from outbox.admin._operations import MessageRef
from outbox.admin._reports import message_ref
from outbox.web._pages import STATUSES, BadQuery, whole

#: the actions the dashboard offers; a resolver returns a subset of these
ACTIONS = ("replay", "purge")
#: what each action may change, by status: ``dead`` also means ``parked``
ACTION_STATUSES = {
    "replay": (Status.FAILED, Status.DEAD, Status.PARKED),
    "purge": (Status.DELIVERED, Status.DEAD, Status.PARKED),
}
#: a CSRF token is good this long after the page that carried it was served
TOKEN_LIFETIME = 12 * 3600
#: the most message references one selection may name (a page holds at most 200 rows)
MAX_SELECTION = 1000
#: the largest action form read (a full selection is about 40 KB)
MAX_FORM_BYTES = 256 * 1024

#: ``create_app(allow_actions=...)``: False (read-only), True (every action), or a resolver that, per
#: request, returns True, False or the names of the actions allowed (``{"replay"}``)
AllowActions = bool | Callable[[Request], bool | Iterable[str]]

audit_log = logging.getLogger("outbox.web.audit")


def rights_of(allow: AllowActions, request: Request) -> frozenset[str]:
    """The actions ``request``'s sender may run under ``allow``; ``ValueError`` for an unknown name (a
    resolver's typo must not silently grant or deny)."""
    value = allow(request) if callable(allow) else allow
    if value is True:
        return frozenset(ACTIONS)
    if value is False or value is None:
        return frozenset()
    if isinstance(value, str):
        value = (value,)
    rights = frozenset(value)
    unknown = sorted(rights - set(ACTIONS))
    if unknown:
        raise ValueError(f"unknown dashboard action {unknown[0]!r}: the actions are {', '.join(ACTIONS)}")
    return rights


def user_of(request: Request) -> str:
    """Who sent ``request``: the authenticated user's name (basic auth, or the host application's
    authentication middleware), else ``anonymous``."""
    user = request.scope.get("user")
    if user is not None and getattr(user, "is_authenticated", False):
        return str(getattr(user, "display_name", None) or user)
    return "anonymous"


class Csrf:
    """CSRF tokens: ``<unix time>.<HMAC-SHA256(secret, time:user)>``, valid for :data:`TOKEN_LIFETIME`.

    Another site can make a browser send a form, but it cannot read a dashboard page to learn a token,
    and a token is bound to the user it was made for. The secret is random per app unless given (give
    the same one to every process of a mounted app served by several workers).
    """

    def __init__(self, secret: bytes | None = None) -> None:
        self.secret = secret or secrets.token_bytes(32)

    def _mac(self, stamp: str, user: str) -> str:
        return hmac.new(self.secret, f"{stamp}:{user}".encode(), hashlib.sha256).hexdigest()

    def token(self, user: str, *, now: float | None = None) -> str:
        stamp = str(int(time.time() if now is None else now))
        return f"{stamp}.{self._mac(stamp, user)}"

    def valid(self, token: str | None, user: str, *, now: float | None = None) -> bool:
        stamp, _, mac = (token or "").partition(".")
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            return False
        age = (time.time() if now is None else now) - int(stamp)
        return 0 <= age <= TOKEN_LIFETIME and hmac.compare_digest(mac, self._mac(stamp, user))


def same_site(request: Request) -> bool:
    """False when the browser says the request comes from another site (``Sec-Fetch-Site``) or names
    an ``Origin`` other than the host it was sent to."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()


class Fields(Protocol):
    """A query string's or a form's fields (Starlette's ``QueryParams``, :class:`FormData`)."""

    def get(self, key: str, /) -> str | None: ...

    def getlist(self, key: str, /) -> list[str]: ...


@dataclass(frozen=True)
class ActionQuery:
    """What one action is about: a selection of messages, or everything a filter matches up to a seq."""

    action: str
    refs: tuple[MessageRef, ...] = ()
    statuses: tuple[str, ...] = ()
    topic: str | None = None
    key: str | None = None
    up_to: int | None = None

    @property
    def is_selection(self) -> bool:
        return bool(self.refs)

    @classmethod
    def parse(cls, action: str, params: Fields, refs: Sequence[str], statuses: Sequence[str]) -> ActionQuery:
        """From a query string or a form (``refs``, ``statuses``: every ``ref=`` / ``status=`` value);
        :class:`BadQuery` naming what is wrong."""
        if action not in ACTIONS:
            raise BadQuery(f"no action {action!r}: the actions are {', '.join(ACTIONS)}")
        named: list[MessageRef] = []
        for text in dict.fromkeys(r for r in refs if r.strip()):
            ref = message_ref(text)
            if ref is None:
                raise BadQuery(f"{text!r} is neither a SEQ nor a message id")
            named.append(ref)
        if len(named) > MAX_SELECTION:
            raise BadQuery(f"{len(named)} messages selected: at most {MAX_SELECTION} at once (use a filter)")
        chosen = tuple(dict.fromkeys(s for s in statuses if s))
        allowed = [s.value for s in ACTION_STATUSES[action]]
        for status in chosen:
            if status not in STATUSES:
                raise BadQuery(f"unknown status {status!r}: use one of {', '.join(STATUSES)}")
            if status not in allowed:
                raise BadQuery(f"cannot {action} {status} messages: only {', '.join(allowed)} ones")
        query = cls(
            action=action,
            refs=tuple(named),
            statuses=chosen,
            topic=params.get("topic") or None,
            key=params.get("key") or None,
            up_to=whole(params.get("up_to"), "up_to", minimum=0),
        )
        if not query.is_selection and not (query.statuses or query.topic or query.key):
            # "everything" must be said, not reached by an empty form: the default is dead messages
            query = cls(action, statuses=(Status.DEAD.value,), up_to=query.up_to)
        return query

    def filter(self, *, up_to: int | None = None) -> MessageFilter:
        """The filter of a filter action (statuses default to dead), bounded by ``up_to``."""
        statuses = self.statuses or (Status.DEAD.value,)
        bound = self.up_to if up_to is None else up_to
        return MessageFilter(tuple(Status(s) for s in statuses), self.topic, self.key, up_to_seq=bound)

    def fields(self, **changes: object) -> list[tuple[str, str]]:
        """This query as form fields or URL parameters, with ``changes``."""
        values: dict[str, object] = {
            "ref": [str(r) for r in self.refs],
            "status": list(self.statuses),
            "topic": self.topic,
            "key": self.key,
            "up_to": self.up_to,
            **changes,
        }
        out: list[tuple[str, str]] = []
        for name, value in values.items():
            if isinstance(value, list):
                out += [(name, str(v)) for v in value]
            elif value is not None:
                out.append((name, str(value)))
        return out

    def describe(self) -> str:
        """For the audit line and the pages: ``seq 5, 7`` / ``status=dead topic=orders.* up to seq 90``."""
        if self.is_selection:
            shown = ", ".join(str(r) for r in self.refs[:20]) + (" ..." if len(self.refs) > 20 else "")
            return f"messages {shown}"
        parts = [f"status={','.join(self.statuses or (Status.DEAD.value,))}"]
        parts += [f"{name}={value}" for name, value in (("topic", self.topic), ("key", self.key)) if value]
        if self.up_to is not None:
            parts.append(f"up to seq {self.up_to}")
        return " ".join(parts)


async def read_form(request: Request) -> list[tuple[str, str]] | None:
    """An urlencoded form's fields, in order; ``None`` if the body is not one (or too big).

    Parsed here rather than with ``request.form()``, which needs python-multipart for forms this
    dashboard never sends."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        return parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None


def client_of(request: Request) -> str:
    """Where ``request`` came from (its peer's address), for the audit."""
    return request.client.host if request.client else "-"


def audit_line(request: Request, action: str, what: str, count: int) -> None:
    """One line on ``outbox.web.audit``: who ran which action on what, and how many messages it changed."""
    audit_log.info(
        "dashboard %s by %s from %s: %s -> %d message(s)",
        action,
        user_of(request),
        client_of(request),
        what,
        count,
    )


class FormData:
    """A form's fields as a query string's: ``get`` (the first value) and ``getlist``."""

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.fields = fields

    def get(self, name: str, default: None = None, /) -> str | None:
        return next((v for k, v in self.fields if k == name), default)

    def getlist(self, name: str, /) -> list[str]:
        return [v for k, v in self.fields if k == name]
