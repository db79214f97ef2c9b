"""The benchmark suite still runs: ``python -m bench --smoke`` end to end, as a subprocess.

Only that it runs and writes well-formed results: the figures of tiny sizes on a shared machine mean
nothing, and ``make bench`` (never part of ``make test``) is where they are measured.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"write_overhead", "drain", "keys", "publish", "latency", "scale", "peers", "consume"}
FIELDS = {"scenario", "variant", "backend", "metric", "median", "spread", "runs", "unit"}


@pytest.mark.timeout(240)
def test_smoke_mode_writes_json_lines_a_table_and_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert done.returncode == 0, f"python -m bench --smoke failed:\n{done.stdout}\n{done.stderr[-4000:]}"

    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    header, measurements = lines[0], [x for x in lines if x["type"] == "measurement"]
    assert header["type"] == "header" and header["mode"] == "smoke"
    assert header["machine"]["nproc"] and "PostgreSQL" in header["machine"]["postgresql_version"]
    assert header["packages"]["sqla-outbox"] != "not installed"
    assert lines[-1]["type"] == "footer" and lines[-1]["failed_scenarios"] == []
    assert {m["scenario"] for m in measurements} == SCENARIOS
    for m in measurements:
        assert set(m) >= FIELDS, m
        assert m["runs"] >= 1 and isinstance(m["median"], float) and math.isfinite(m["median"]), m
        assert m["spread"]["min"] <= m["median"] <= m["spread"]["max"], m

    table = (out / "table.txt").read_text()
    assert table.splitlines()[0].startswith("| scenario") and "drain" in table
    assert table.splitlines()[0] in done.stdout, "the table is printed at the end"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(120)
def test_the_write_probe_runs_and_prints_every_variant() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.probe_write", "--transactions", "30", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, f"python -m bench.probe_write failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("round 1: plain "), done.stdout
    for variant in ("+outbox", "+insert in the commit's round trip", "+message built, not written", "+spin"):
        assert f"{variant} " in last, last
