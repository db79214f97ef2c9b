"""Secrets kept out of every output: which configured values are secrets, and how text is masked.

A password reaches the configuration in one of these ways, and each is masked wherever text leaves a
process (log lines, CLI output and errors, ``--json``, ``outbox doctor``, ``/metrics``, ``/readyz``):

- in a database URL's userinfo: ``postgresql://app:SECRET@db/shop``;
- in a database URL's query string: ``?password=SECRET``, and every other parameter whose name says it
  holds a secret (:func:`is_secret_parameter`: ``passwd``, ``sslpassword``, ``ssl_key_password``,
  ``client_secret``, ...), which the drivers accept as well;
- the Kafka SASL password.

Two guards, because the first cannot see what a driver or a library prints:

1. what this code prints is masked at the source: :func:`mask_url` for every URL shown;
2. every line on its way out goes through :func:`scrub`, which replaces each secret :func:`remember`
   was given (the CLI gives it those of its :class:`~outbox.cli._config.Settings`) and any secret shaped
   like one, known or not: a URL's password, ``password=...``, ``'sasl_plain_password': '...'``.

Values shorter than :data:`MIN_REMEMBERED` characters are masked by shape only (guard 2 would replace
every ``ab`` in a message otherwise): their shapes above still hide them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

import sqlalchemy as sa
from sqlalchemy.engine import make_url

MASK = "***"
#: secrets shorter than this are not replaced wherever they occur, only where their shape says so
MIN_REMEMBERED = 4

# A parameter name that holds a secret: password, passwd, passphrase, pwd, secret, alone or as the end
# of a longer name (sslpassword, ssl_key_password, key_passphrase, client_secret). Not "passfile", a path.
_SECRET_NAME = r"[A-Za-z0-9_.-]*?(?:password|passwd|passphrase|secret)|pwd|pass"
_SECRET_NAME_RE = re.compile(rf"^(?:{_SECRET_NAME})$", re.IGNORECASE)
#: ``scheme://user:password@``: the password part
_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)[^@\s/]+@")
#: ``password=SECRET`` in a query string, a libpq conninfo, keyword arguments: the value (not a ``:``
#: that ends it, as in "at postgresql://h/db?password=***: connection refused")
_SECRET_ASSIGNMENT = re.compile(
    rf"((?:^|(?<=[?&;,\s(]))(?:{_SECRET_NAME})\s*=\s*)(['\"]?)[^&#\s'\",;)]*[^&#\s'\",;):]\2", re.IGNORECASE
)

#: ``'password': 'SECRET'`` in a printed dict (kafka-python logs its whole configuration at DEBUG)
_SECRET_ITEM = re.compile(rf"""((['"])(?:{_SECRET_NAME})\2\s*:\s*)(['"])(?:\\.|(?!\3).)*\3""", re.IGNORECASE)

_known: set[str] = set()
_known_lock = threading.Lock()


def is_secret_parameter(name: str) -> bool:
    """True when a URL query parameter (or a driver keyword) named ``name`` holds a secret."""
    return bool(_SECRET_NAME_RE.match(name))


def url_secrets(url: str | sa.URL) -> tuple[str, ...]:
    """Every secret written in a database URL: its userinfo password and its secret query values."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except Exception:
        return ()
    found: list[str] = []
    if parsed.password:
        found.append(str(parsed.password))
    for name, value in parsed.query.items():
        if is_secret_parameter(name):
            found.extend([value] if isinstance(value, str) else value)
    return tuple(found)


def mask_url(url: str | sa.URL) -> str:
    """The URL with its password and every secret query parameter replaced by ``***``."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
        return _mask_shapes(parsed.render_as_string(hide_password=True))
    except Exception:
        return "<unparseable URL>"


def remember(secrets: Iterable[str | None]) -> None:
    """Have :func:`scrub` replace each of ``secrets`` (and its URL-encoded forms) from now on."""
    with _known_lock:
        for secret in secrets:
            if secret and len(secret) >= MIN_REMEMBERED:
                _known.update({secret, quote(secret, safe=""), quote_plus(secret, safe="")})


def scrub(text: str) -> str:
    """``text`` with every remembered secret, and any URL or ``password=`` secret, replaced by ``***``."""
    with _known_lock:
        known = sorted(_known, key=len, reverse=True)  # longest first: an encoded form contains the plain
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    return _mask_shapes(text)


def scrub_bytes(body: bytes) -> bytes:
    """:func:`scrub` for a UTF-8 body (``/metrics``, ``/readyz``)."""
    return scrub(body.decode("utf-8", errors="replace")).encode()


def _mask_shapes(text: str) -> str:
    text = _URL_USERINFO.sub(rf"\1{MASK}@", text)
    text = _SECRET_ITEM.sub(lambda m: f"{m[1]}{m[3]}{MASK}{m[3]}", text)
    return _SECRET_ASSIGNMENT.sub(lambda m: f"{m[1]}{m[2]}{MASK}{m[2]}", text)
