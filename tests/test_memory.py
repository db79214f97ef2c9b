"""Bounded memory: a relay holds at most ``--max-in-flight-bytes`` of claimed payloads, so its memory
follows that setting, not the claim size times the payload size (issue 13, point 4)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import sqlalchemy as sa

import outbox
from outbox.writer import DEFAULT_MAX_PAYLOAD_BYTES
from tests.apps import RelayLauncher, RelayProcess
from tests.apps.recording import TOPIC
from tests.conftest import status_counts, wait_until

MIB = 1024 * 1024
IN_FLIGHT_MIB = 16
#: the documented bound (docs/performance.md, "How much memory"): 128 MiB for the relay itself, plus six
#: times --max-in-flight-bytes (the rows as the driver reads them: PostgreSQL sends bytea hex-encoded, twice
#: their size; the stored bytes; the decoded payloads; a claim's rows read while the last one's are being
#: freed). Measured here: 130-192 MiB (PostgreSQL the highest), 210 once with the whole suite running
#: beside it, over the five times documented before; with no bound on the bytes in flight (the old relay:
#: claim size x payload size), 392-570 MiB.
BOUND_MIB = 128 + 6 * IN_FLIGHT_MIB


def peak_rss_mib(relay: RelayProcess) -> float:
    for line in Path(f"/proc/{relay.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.slow
def test_forty_messages_at_the_maximum_payload_size_stay_under_the_memory_bound(
    engine: sa.Engine, relays: RelayLauncher
) -> None:
    pad = "x" * (DEFAULT_MAX_PAYLOAD_BYTES - 200)  # each payload just under the maximum, as JSON
    for i in range(40):
        with engine.begin() as conn:
            outbox.add(conn, TOPIC, {"i": i, "pad": pad})
    relay = relays.start(workers=4, poll_interval=0.1, max_in_flight_bytes=IN_FLIGHT_MIB * MIB)
    wait_until(lambda: status_counts(engine) == {"delivered": 40}, timeout=120, what="all delivered")
    peak = peak_rss_mib(relay)
    relay.send(signal.SIGTERM)
    assert relay.wait_exit(timeout=30) == 0, relay.log_tail()
    assert peak < BOUND_MIB, f"peak RSS {peak:.0f} MiB for 40 x 4 MiB payloads"
