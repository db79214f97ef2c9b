"""Reading the results: the plain-text table printed at the end, and the PNG plot (matplotlib, Agg)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.harness import Result


def _fmt(value: float) -> str:
    if value != value:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(results: list[Result], notes: list[str] | None = None) -> str:
    """One row per figure: scenario, variant, backend, metric, median and [min - max] over the runs."""
    headers = ("scenario", "variant", "backend", "metric", "median", "min - max", "runs", "unit")
    rows = [
        (
            r.scenario,
            r.variant,
            r.backend,
            r.metric,
            _fmt(r.median),
            f"{_fmt(min(r.values))} - {_fmt(max(r.values))}" if r.values else "-",
            str(len(r.values)),
            r.unit,
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    right = {4, 5, 6}

    def line(cells: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    out = [
        line(headers),
        "|"
        + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths))
        + "|",
    ]
    out += [line(row) for row in rows]
    if notes:
        out.append("")
        out += [f"- {note}" for note in notes]
    return "\n".join(out)


#: figures left out of the plot (context in the table, not results): the pacing writer's own numbers, and
#: the CPU figures that say what bounds a result
SECONDARY = {
    "writer rate",
    "writer commit p50",
    "VmRSS",
    "machine CPU busy",
    "relay CPU per msg",
    "db CPU per msg",
    "CPU per msg",
    "CPU per job",
    "db CPU per job",
}


def plot(results: list[Result], path: Path) -> None:
    """A grid of horizontal bar charts, one per scenario and unit: medians with min-max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        if r.values and r.metric not in SECONDARY:
            groups.setdefault((r.scenario, r.unit), []).append(r)
    if not groups:
        return
    columns = 2
    rows = (len(groups) + columns - 1) // columns
    tallest = max(len(rs) for rs in groups.values())
    fig, axes = plt.subplots(
        rows, columns, figsize=(16, rows * max(2.2, 0.22 * tallest + 0.8)), squeeze=False
    )
    for ax, ((scenario, unit), rs) in zip(axes.flat, groups.items(), strict=False):
        metrics = {r.metric for r in rs}
        backends = {r.backend for r in rs}
        labels = [
            " ".join(
                part
                for part in (
                    r.variant,
                    f"[{r.backend}]" if len(backends) > 1 else "",
                    r.metric if len(metrics) > 1 else "",
                )
                if part
            )
            for r in rs
        ]
        medians = [r.median for r in rs]
        low = [r.median - min(r.values) for r in rs]
        high = [max(r.values) - r.median for r in rs]
        ys = list(range(len(rs)))
        colours = ["#4C72B0" if _is_reference(r.variant) else "#DD8452" for r in rs]
        ax.barh(ys, medians, xerr=[low, high], color=colours, ecolor="#333333", capsize=2, height=0.7)
        ax.set_yticks(ys, labels, fontsize=7)
        ax.invert_yaxis()
        title = f"{scenario}: {unit}" + (f" ({next(iter(backends))})" if len(backends) == 1 else "")
        ax.set_title(title, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        if unit == "x":
            ax.axvline(1.0, color="#999999", linewidth=0.8, linestyle="--")
        if unit == "ms":
            ax.set_xscale("log")
        for y, value in zip(ys, medians, strict=True):
            ax.text(value, y, f" {_fmt(value)}", va="center", fontsize=6)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle(
        "sqla-outbox benchmarks: medians of the runs, whiskers min-max; orange: sqla-outbox, blue: reference",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _is_reference(variant: str) -> bool:
    """A bar that is not sqla-outbox itself: a peer, a client alone, or the transaction without the outbox."""
    if " / " in variant:  # a ratio of ours to something
        return False
    return (
        variant.startswith(("pgqueuer", "procrastinate", "naive"))
        or "alone" in variant
        or variant.endswith("plain")
    )


@dataclass(frozen=True)
class Target:
    """One of the issue's targets: which figure, the bound, and which side of it passes."""

    text: str
    scenario: str
    variant: str
    metric: str
    bound: float
    at_least: bool = True
    backend: str = "postgresql"


TARGETS = (
    *(
        Target(
            f"write overhead, {api} x{w}: +outbox >= 90 % of plain",
            "write_overhead",
            f"{api} x{w} +outbox / plain",
            "ratio",
            0.90,
        )
        for api in ("sync", "async")
        for w in (1, 8)
    ),
    Target("drain, PostgreSQL, 1 relay: >= 20,000 msg/s", "drain", "1 relay", "throughput", 20_000),
    Target(
        "drain >= 2.5 x pgqueuer (default batch 10)", "peers", "relay drain / pgqueuer drain", "ratio", 2.5
    ),
    Target(
        "drain >= 2.5 x pgqueuer (batch 250)", "peers", "relay drain / pgqueuer batch 250 drain", "ratio", 2.5
    ),
    Target(
        "publish, kafka-python: >= 70 % of its ceiling",
        "publish",
        "relay / ceiling (kafka-python)",
        "ratio",
        0.70,
    ),
    Target("publish, confluent: >= 15,000 msg/s", "publish", "relay (confluent)", "throughput", 15_000),
    *(
        Target(
            f"publish, {client}, one key: >= 0.7 of unkeyed (issue 14)",
            "publish",
            f"relay, one key / unkeyed ({client})",
            "ratio",
            0.70,
        )
        for client in ("kafka-python", "confluent")
    ),
    Target(
        "latency, NOTIFY, 1,000 msg/s: p50 < 5 ms (from commit)",
        "latency",
        "notify",
        "p50 from commit",
        5.0,
        at_least=False,
    ),
    Target(
        "latency, NOTIFY, 1,000 msg/s: p99 < 50 ms (from commit)",
        "latency",
        "notify",
        "p99 from commit",
        50.0,
        at_least=False,
    ),
    *(
        Target(
            f"latency, NOTIFY, 1,000 msg/s over 10 keys: {name} < {bound:g} ms (from commit; issue 14)",
            "latency",
            "notify, 10 keys",
            f"{name} from commit",
            bound,
            at_least=False,
        )
        for name, bound in (("p50", 5.0), ("p99", 50.0))
    ),
    Target("scale: 5M delivered kept within 20 % of empty", "scale", "5M kept / empty", "ratio", 0.80),
    Target(
        "scale: peak RSS draining 1M < 200 MB",
        "scale",
        "peak RSS, 1,000,000 backlog",
        "VmHWM",
        200.0,
        at_least=False,
    ),
)


def targets(results: list[Result]) -> str:
    """The issue's targets against this run's medians: met, missed, or not measured in this mode."""
    found = {(r.scenario, r.variant, r.backend, r.metric): r for r in results}
    rows = ["| target | median | min - max | met? |", "|---|---:|---:|---|"]
    for t in TARGETS:
        r = found.get((t.scenario, t.variant, t.backend, t.metric))
        if r is None or not r.values:
            rows.append(f"| {t.text} | - | - | not measured in this mode |")
            continue
        ok = r.median >= t.bound if t.at_least else r.median < t.bound
        spread = f"{_fmt(min(r.values))} - {_fmt(max(r.values))}"
        rows.append(f"| {t.text} | {_fmt(r.median)} {r.unit} | {spread} | {'met' if ok else 'MISSED'} |")
    return "\n".join(rows)
