"""The ceiling of the consume benchmark: a bare kafka-python ``KafkaConsumer`` reading ``COUNT`` records.

``python -m bench.consume_ceiling BOOTSTRAP TOPIC GROUP COUNT`` reads the topic from the start in a group
of its own (no handler, no database, auto-commit off: the best a kafka-python consumer does here) and
prints one JSON line: ``{"rate": records/s, "records": n}``, timed from the first record to the last, so
that joining the group is not counted (as for ``outbox consume``).
"""

from __future__ import annotations

import json
import sys
import time


def main(bootstrap: str, topic: str, group: str, count: int) -> dict[str, float]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        max_poll_records=500,
        fetch_max_wait_ms=50,
    )
    seen = at_first = 0
    first = last = 0.0
    deadline = time.monotonic() + 120 + count / 1000
    try:
        while seen < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                if records and not seen:
                    first, at_first = time.monotonic(), len(records)
                seen += len(records)
            last = time.monotonic()
    finally:
        consumer.close(autocommit=False)
    rate = (seen - at_first) / (last - first) if seen > at_first and last > first else float("nan")
    return {"rate": rate, "records": seen}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))
