"""The topics a relay can route, as the claim's SQL condition (``relay._claim``, invariant 15).

A relay claims only the topics its publishers take: the in-process handlers say which (the registry's
exact names and shell-style patterns, :meth:`consumers.Registry.topics`); a publisher that may take any
topic (Kafka, or one of your own that does not list its topics) makes the relay claim every topic. The
scan's condition is exact for names and for ``*`` and ``?``, compared case-sensitively on each database
(PostgreSQL's ``LIKE``, SQLite's ``GLOB``, MariaDB's ``LIKE`` on the bytes); a character class (``[ab]``)
is widened to any one character in SQL (SQLite's ``GLOB`` keeps it), so a row the condition lets through
is checked again exactly (:meth:`Topics.matches`) before it is handed out.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from consumers._registry import is_pattern
from outbox._dialects import Dialect

#: LIKE's escape character: not in the topic alphabet ([A-Za-z0-9._-]), escaped itself when a pattern
#: holds it anyway
_ESCAPE = "/"


@dataclass(frozen=True)
class Topics:
    """Exact topic names and shell-style patterns (``orders.*``): the topics a relay may claim."""

    names: frozenset[str]
    patterns: tuple[str, ...]

    @classmethod
    def of(cls, topics: Iterable[str]) -> Topics:
        """Split ``topics`` (names and patterns, as a registry lists them) into names and patterns."""
        names: set[str] = set()
        patterns: list[str] = []
        for topic in topics:
            if is_pattern(topic):
                if topic not in patterns:
                    patterns.append(topic)
            else:
                names.add(topic)
        return cls(frozenset(names), tuple(patterns))

    def __bool__(self) -> bool:
        return bool(self.names or self.patterns)

    def matches(self, topic: str) -> bool:
        """Whether ``topic`` is one of these (exactly, as the registry routes it)."""
        return topic in self.names or any(fnmatch.fnmatchcase(topic, p) for p in self.patterns)

    def condition(self, column: sa.ColumnElement[str], dialect: Dialect) -> sa.ColumnElement[bool]:
        """SQL true for the rows whose ``column`` (a topic) these may route (and, for a pattern with a
        character class, a few more: see the module docstring). False when there is no topic."""
        if dialect.topic_match == "binary":  # MariaDB: compare bytes, not the column's collation
            compared: sa.ColumnElement[Any] = sa.func.binary(column)
        else:
            compared = column
        parts: list[sa.ColumnElement[bool]] = []
        if self.names:
            parts.append(compared.in_(sorted(self.names)))
        for pattern in self.patterns:
            if dialect.topic_match == "glob":
                parts.append(column.op("GLOB")(_glob(pattern)))
            else:
                parts.append(compared.like(_like(pattern), escape=_ESCAPE))
        return sa.or_(*parts) if parts else sa.false()


def _like(pattern: str) -> str:
    """A shell-style pattern as a LIKE pattern (escape :data:`_ESCAPE`); a class becomes ``_``."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch == "[" and (end := _class_end(pattern, i)) is not None:
            out.append("_")
            i = end + 1
        elif ch in ("%", "_", _ESCAPE):
            out.append(_ESCAPE + ch)
        else:
            out.append(ch)
    return "".join(out)


def _glob(pattern: str) -> str:
    """A shell-style pattern as SQLite's GLOB: the same syntax, but a negated class is ``[^...]``."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "[" and (end := _class_end(pattern, i)) is not None:
            body = pattern[i:end]
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = end + 1
        elif ch == "[":
            out.append("[[]")  # a lone "[" is itself, as in fnmatch
        else:
            out.append(ch)
    return "".join(out)


def _class_end(pattern: str, start: int) -> int | None:
    """The index of the ``]`` closing a class whose ``[`` is just before ``start`` (fnmatch's rules: a
    leading ``!`` and then a leading ``]`` are part of the class), else None (the ``[`` is literal)."""
    j = start
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    end = pattern.find("]", j)
    return None if end < 0 else end
