"""How payloads become bytes in the table, and back.

Encoding rules (docs/writing-messages.md documents them; consumers in other languages rely on them):

- ``bytes`` / ``bytearray`` / ``memoryview`` are stored as given, content type ``application/octet-stream``.
- Everything else is JSON (UTF-8, content type ``application/json``) with these extra encodings:
  ``uuid.UUID`` -> its canonical string; ``datetime`` / ``date`` / ``time`` -> ISO 8601 string
  (``datetime.isoformat()``, so an aware datetime keeps its offset); ``decimal.Decimal`` -> its exact
  string (``"12.30"``, never a float); dataclass instances -> an object of their fields (recursively);
  ``enum.Enum`` -> its value; ``set`` / ``frozenset`` / ``tuple`` -> an array.
- NaN and infinities are refused (they are not JSON).

Anything else raises :class:`outbox.PayloadError` naming the offending value and its type.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import uuid
from typing import Any

from outbox._errors import PayloadError

JSON = "application/json"
BINARY = "application/octet-stream"


class _Unserialisable(TypeError):
    pass


def _default(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise _Unserialisable(f"non-finite Decimal {value}")
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return list(value)
    raise _Unserialisable(f"object of type {type(value).__name__} is not JSON-serialisable: {value!r:.80}")


_encoder = json.JSONEncoder(default=_default, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encode_payload(payload: Any) -> tuple[bytes, str]:
    """Return ``(bytes, content_type)`` for ``payload`` or raise :class:`PayloadError`."""
    if isinstance(payload, bytes):
        return payload, BINARY
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload), BINARY
    try:
        return _encoder.encode(payload).encode("utf-8"), JSON
    except (_Unserialisable, TypeError, ValueError) as exc:
        raise PayloadError(f"payload cannot be serialised: {exc}") from None
    except RecursionError:
        raise PayloadError("payload cannot be serialised: it contains a reference cycle") from None


def decode_payload(data: bytes, content_type: str) -> Any:
    """Inverse of :func:`encode_payload` (JSON extras come back as their JSON form, e.g. strings)."""
    if content_type == JSON:
        return json.loads(data.decode("utf-8"))  # we always write UTF-8: skip json's encoding sniffing
    return bytes(data)


def encode_headers(headers: dict[str, str] | None) -> str | None:
    """Headers are stored as a compact JSON object (already validated as str -> str)."""
    if not headers:
        return None
    return json.dumps(headers, ensure_ascii=False, separators=(",", ":"))


def decode_headers(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    value = json.loads(text)
    return dict(value) if isinstance(value, dict) else {}
