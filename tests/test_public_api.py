"""The public surface says what it is: ``docs/api.md`` lists exactly each package's ``__all__``, every
listed name imports, and every ``outbox.…`` / ``relay.…`` / ``consumers.…`` path the README and the docs
mention resolves (so a move that forgets a documented path fails here, not in a user's code)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = (
    "outbox",
    "outbox.alembic",
    "consumers",
    "relay",
    "relay.publishers",
    "outbox.admin",
    "outbox.cli",
    "outbox.web",
)

#: dotted words in the docs that are not import paths
NOT_PATHS = {
    "relay.maintenance.findings",  # docs/operations.md: the attribute of a running Relay (an instance)
    "outbox.web.audit",  # docs/web.md: a logger's name
}


def api_sections() -> dict[str, list[str]]:
    """``{package: [names in the first column of its table]}`` from docs/api.md."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in API.read_text(encoding="utf-8").splitlines():
        heading = re.fullmatch(r"## `([a-z_.]+)`", line)
        if heading:
            current = sections.setdefault(heading.group(1), [])
        elif line.startswith("## "):
            current = None
        elif current is not None:
            row = re.match(r"\| `([A-Za-z_][A-Za-z0-9_]*)` \|", line)
            if row:
                current.append(row.group(1))
    return sections


def resolve(path: str) -> Any:
    """The module or attribute ``path`` names (the longest importable module prefix, then attributes)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            value = getattr(value, name)
        return value
    raise ModuleNotFoundError(path)


def documented_paths() -> list[str]:
    paths: set[str] = set()
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        paths.update(re.findall(r"`((?:outbox|relay|consumers)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text))
        imports = re.findall(r"from ((?:outbox|relay|consumers)[a-z_.]*) import (\w+(?:, *\w+)*)", text)
        for module, names in imports:
            paths.update(f"{module}.{name.strip()}" for name in names.split(","))
    return sorted(paths - NOT_PATHS)


def test_docs_api_has_a_section_per_package() -> None:
    assert sorted(api_sections()) == sorted(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_docs_api_lists_exactly_the_packages_all(package: str) -> None:
    listed = api_sections()[package]
    assert len(listed) == len(set(listed)), f"{package}: a name is listed twice"
    assert sorted(listed) == sorted(importlib.import_module(package).__all__)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_imports(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


@pytest.mark.parametrize("path", documented_paths())
def test_every_documented_path_resolves(path: str) -> None:
    resolve(path)


def test_the_documented_paths_are_found() -> None:
    """The scan itself works: it finds the docs' best-known paths."""
    found = documented_paths()
    for path in ("relay.Relay", "consumers.handler", "relay.publishers.kafka.KafkaSettings", "outbox.add"):
        assert path in found


def test_every_source_file_the_docs_name_exists() -> None:
    """``relay/_claim.py`` in docs/guarantees.md or docs/architecture.md is a file that is there."""
    named = set()
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        named.update(re.findall(r"`((?:outbox|relay|consumers)/[\w/]+\.py)`", text))
    assert named, "the scan found no source file"
    assert sorted(path for path in named if not (ROOT / path).is_file()) == []


def source_modules() -> list[str]:
    """Every module of the three packages, by dotted name (a package by its own name)."""
    modules = []
    for package in ("outbox", "relay", "consumers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules.append(".".join(parts))
    return modules


def is_private(module: str) -> bool:
    """``relay._claim``, ``outbox._runtime.ops_server``: a part of the path starts with ``_`` (but
    ``__main__``, ``python -m outbox``, is the command)."""
    return any(part.startswith("_") and part != "__main__" for part in module.split("."))


def api_documented_modules() -> set[str]:
    """The packages with a section in docs/api.md, and every module a path on that page starts with."""
    text = API.read_text(encoding="utf-8")
    paths = set(api_sections())
    paths.update(re.findall(r"`((?:outbox|relay|consumers)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text))
    return {".".join(path.split(".")[:cut]) for path in paths for cut in range(1, path.count(".") + 2)}


def test_a_module_without_an_underscore_is_documented() -> None:
    """A module whose name does not start with ``_`` is public: a package with its section in
    docs/api.md, ``outbox.__main__``, or a module that page names. A new internal module gets a ``_``
    name (``relay/_claim.py``); a new public one gets its line in docs/api.md."""
    documented = api_documented_modules()
    undocumented = [
        module
        for module in source_modules()
        if not is_private(module) and not module.endswith(".__main__") and module not in documented
    ]
    assert undocumented == [], "undocumented public modules: give them a leading _ or document them"


def test_every_module_docs_api_documents_is_public() -> None:
    """What docs/api.md promises has a public name: no documented module is an underscored one."""
    documented = api_documented_modules() & set(source_modules())
    assert sorted(module for module in documented if is_private(module)) == []


def test_the_module_check_catches_a_new_plain_module() -> None:
    documented = api_documented_modules()
    assert "relay.maintenance" in documented and "relay.publishers.confluent" in documented
    assert "relay.claim" not in documented and is_private("relay._claim")
    assert is_private("outbox._runtime.ops_server") and not is_private("outbox.__main__")
