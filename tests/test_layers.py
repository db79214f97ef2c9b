"""Imports run one way, down the layers of ``docs/architecture.md``: nothing below imports anything above.

Every module of ``outbox``, ``relay`` and ``consumers`` is read with :mod:`ast` (nothing is imported),
and every ``import`` in it, at module level, inside a function or under ``TYPE_CHECKING``, is checked
against the layer table below. A module in no layer fails too, so a new package has to be placed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("outbox", "relay", "consumers")

#: bottom first; a module belongs to the layer of the longest prefix that names it
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("write path and shared primitives", ("outbox",)),
    ("process plumbing", ("outbox._runtime",)),
    ("consumers", ("consumers",)),
    ("relay", ("relay",)),
    ("operator layer", ("outbox.admin",)),
    ("web dashboard", ("outbox.web",)),
    ("CLI", ("outbox.cli", "outbox.__main__")),
)


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of ``module`` (-1: in none)."""
    best, best_length = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def project_modules() -> dict[str, Path]:
    """Every module of the three packages, by dotted name (a package by its own name)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_modules(source: str, module: str, known: set[str]) -> list[tuple[int, str]]:
    """``(line, module)`` for each project module ``source`` imports; ``from pkg import name`` counts
    as importing ``pkg.name`` when that is a module, else ``pkg``."""
    is_package = module in known and any(other.startswith(module + ".") for other in known)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else base))
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def upward_imports(modules: dict[str, str]) -> list[str]:
    """One line per import that goes up a layer, in ``modules`` (name -> source)."""
    known = set(modules)
    problems = []
    for module, source in modules.items():
        own = layer_of(module)
        for line, target in imported_modules(source, module, known):
            if layer_of(target) > own:
                problems.append(
                    f"{module}:{line} imports {target} ({LAYERS[layer_of(target)][0]}), "
                    f"above its own layer ({LAYERS[own][0]})"
                )
    return problems


def test_every_module_has_a_layer() -> None:
    assert [name for name in project_modules() if layer_of(name) < 0] == []


def test_nothing_imports_a_layer_above_its_own() -> None:
    modules = {name: path.read_text(encoding="utf-8") for name, path in project_modules().items()}
    assert upward_imports(modules) == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("relay._retention", "from outbox.admin._operations import Operations\n"),
        ("outbox.writer", "def f():\n    from relay import Relay\n"),  # a lazy import counts too
        ("consumers._kafka", "import relay._runner\n"),
        ("outbox._runtime.ops_server", "from outbox import cli\n"),  # a submodule named in a from-import
        ("outbox.admin._doctor", "from .. import cli\n"),  # relative
    ],
)
def test_an_upward_import_is_caught(module: str, source: str) -> None:
    modules = {name: "" for name in project_modules()} | {module: source}
    assert len(upward_imports(modules)) == 1


def test_the_kafka_clients_do_not_import_each_other() -> None:
    """The librdkafka publisher shares the kafka-python one's rules through
    relay.publishers._kafka_records, never by importing it (kafka.py may load it, in publisher_for)."""
    modules = project_modules()
    source = modules["relay.publishers.confluent"].read_text(encoding="utf-8")
    imported = {name for _, name in imported_modules(source, "relay.publishers.confluent", set(modules))}
    assert "relay.publishers.kafka" not in imported


def test_the_outcome_vocabulary_imports_neither_its_producer_nor_its_observers() -> None:
    modules = project_modules()
    source = modules["relay._outcomes"].read_text(encoding="utf-8")
    imported = {name for _, name in imported_modules(source, "relay._outcomes", set(modules))}
    assert imported.isdisjoint({"relay._completer", "relay.observers", "relay._runner"})


def test_the_cli_loads_neither_the_relay_nor_the_consumers_until_a_command_needs_them() -> None:
    """``outbox status`` and the other operator commands start without the relay's or the consumer
    runner's code (and so without a Kafka client): those are imported inside their commands."""
    code = (
        "import sys, outbox.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('relay', 'consumers', 'kafka')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]", result.stdout
