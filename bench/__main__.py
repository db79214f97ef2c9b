"""``python -m bench [--quick | --smoke] [--only NAME ...] [--out DIR] [--runs N]``.

Runs the scenarios in order, writes ``results.jsonl`` (a header line, then one JSON object per
measurement), ``table.txt`` and ``results.png`` into the output folder, and prints the table at the end.
Modes: full (``make bench``, about half an hour here), ``--quick`` (``make bench-quick``, about two
minutes) and ``--smoke`` (tiny sizes, one run: the test suite's check that everything still runs).
``BENCH_SCALE`` multiplies every message count (e.g. ``BENCH_SCALE=0.1``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import consume, drain, keys, latency, peers, publish, report, scale, write_overhead
from bench.harness import ROOT, Recorder, Settings, log

SCENARIOS = {
    module.NAME: module for module in (write_overhead, drain, keys, publish, latency, scale, peers, consume)
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the two-minute subset (small sizes)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, one run: checks that it all runs")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(SCENARIOS), metavar="NAME", help="scenarios to run"
    )
    parser.add_argument("--out", type=Path, help="output folder (default bench/results[/quick|/smoke])")
    parser.add_argument("--runs", type=int, help="repetitions per figure (default: full 5, quick 3, smoke 1)")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    out = args.out or (ROOT / "bench" / "results" if mode == "full" else ROOT / "bench" / "results" / mode)
    scale = float(os.environ.get("BENCH_SCALE", "1"))
    runs = args.runs or {"full": 5, "quick": 3}.get(mode, 1)
    names = args.only or list(SCENARIOS)
    started = time.monotonic()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="outbox-bench-") as tmp:
        settings = Settings(mode=mode, runs=runs, scale=scale, out=out, tmp=Path(tmp))
        recorder = Recorder(settings, argv)
        log(f"mode {mode}, {runs} run(s) per figure, scale {scale}, scenarios: {', '.join(names)}")
        for name in names:
            log(f"--- {name}")
            recorder.context(name)
            began = time.monotonic()
            try:
                SCENARIOS[name].run(settings, recorder)
            except Exception as exc:
                failures.append(name)
                log(f"{name} FAILED: {type(exc).__name__}: {exc}")
                traceback.print_exc(file=sys.stderr)
                recorder.note(name, f"FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            log(f"--- {name} took {time.monotonic() - began:.0f}s")
        elapsed = time.monotonic() - started
        recorder.finish(elapsed, failures)
    table = report.table(recorder.results, recorder.notes)
    table += "\n\nTargets of issue 5 (medians of this run):\n\n" + report.targets(recorder.results)
    (out / "table.txt").write_text(table + "\n")
    try:
        report.plot(recorder.results, out / "results.png")
    except Exception as exc:  # the numbers matter more than the picture
        failures.append("plot")
        log(f"plot FAILED: {type(exc).__name__}: {exc}")
    print(table)
    print(f"\n{len(recorder.results)} measurements in {elapsed:.0f}s; results in {out}/results.jsonl")
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
