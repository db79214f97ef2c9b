"""The benchmark suite: ``python -m bench [--quick | --smoke] [--only NAME ...] [--out DIR]``.

What it measures (one module per scenario, each says what and why in its docstring):

- :mod:`bench.write_overhead`: the cost of ``outbox.add`` on a business transaction;
- :mod:`bench.drain`: how fast one, then two relays empty a backlog into no-op handlers;
- :mod:`bench.publish`: how fast the relay publishes a backlog to Kafka, beside the client's own ceiling;
- :mod:`bench.latency`: commit-to-handler latency at a steady 1,000 messages/s, NOTIFY vs polling;
- :mod:`bench.scale`: drain throughput with millions of delivered rows kept, and the relay's peak memory;
- :mod:`bench.peers`: pgqueuer, procrastinate and a hand-written naive relay doing the same jobs.

How it measures (:mod:`bench.harness`): a fresh database per scenario on the local servers (dropped
after), every figure a median over repeated runs with its min/max, every comparison a ratio measured in the
same run, results as JSON lines plus a table and a plot (:mod:`bench.report`). Relays, writers and peers
run in their own processes (:mod:`bench.processes` starts them, :mod:`bench.worker` is their entry
point) so that none shares a GIL with the harness or with another.

Never part of ``make test`` (too slow and too noisy); ``tests/test_bench_smoke.py`` only checks that the
smallest mode runs end to end.
"""
