"""The operator layer: one API for what an operator asks of an outbox and changes in it.

``outbox status``, ``list``, ``show``, ``replay``, ``purge`` and ``doctor`` are thin commands over this
package (:mod:`outbox.cli`), and the web dashboard is to be built on it too, so that the two can never
behave differently. It sits on top of the layers (see ``docs/architecture.md``): it may import the write
path, ``consumers`` and ``relay``; nothing below imports it.

- :mod:`outbox.admin._operations`: :class:`Operations`, the queries and changes behind status, list, show,
  replay and purge, with the promises each keeps;
- :mod:`outbox.admin._reports`: the plain values they return (:class:`StatusReport`,
  :class:`MessageRecord`, ...), each with its ``to_dict()`` for ``--json``;
- :mod:`outbox.admin._doctor`: :func:`diagnose`, the health checks of a database an outbox runs on, and
  :mod:`outbox.admin._probes`, the database-specific SQL they run.
"""

from __future__ import annotations

from outbox.admin._doctor import DoctorReport, Finding, Level, Thresholds, diagnose, format_report
from outbox.admin._operations import Operations
from outbox.admin._reports import (
    Activity,
    AuditRecord,
    HeldKey,
    MessageFilter,
    MessageRecord,
    PurgeResult,
    RelayRecord,
    ReplayResult,
    StatusReport,
)

__all__ = [
    "Activity",
    "AuditRecord",
    "DoctorReport",
    "Finding",
    "HeldKey",
    "Level",
    "MessageFilter",
    "MessageRecord",
    "Operations",
    "PurgeResult",
    "RelayRecord",
    "ReplayResult",
    "StatusReport",
    "Thresholds",
    "diagnose",
    "format_report",
]
