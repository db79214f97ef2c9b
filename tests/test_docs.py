"""The documentation is tested like code: the site builds in strict mode, every Python example in the
README and the docs runs, and every ``outbox`` command line in them uses options the command has.

An example that printed ``"order_id": null`` while its comment promised 42 is what this catches: each
Python block of README.md and docs/*.md runs as a script (on SQLite, in a fresh directory, with a
timeout). A comment just before a block says how it is treated, and a block without one runs alone:

- ``<!-- example: NAME -->``: the blocks of a page with the same NAME run as one script, in page order
  (an example told in several steps);
- ``<!-- excerpt: PATH ... -->``: an excerpt of files of the repository, not run here: each of its code
  lines must be a line of one of those files, so the excerpt cannot drift from the code it shows;
- ``<!-- not run: REASON -->``: not run, and REASON must say why (a few words at least).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
import yaml

from outbox.cli import outbox as outbox_command

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "BENCHMARKS.md"]
EXAMPLE_TIMEOUT = 60
MKDOCS_BUILD = [sys.executable, "-m", "mkdocs", "build", "--strict"]
#: as make docs: without Material's banner about its successor (printed on every build, not a warning)
BUILD_ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^`\n]*)$")
#: a marker is an HTML comment at the start of a line (one quoted in a sentence, in backquotes, is not)
MARKER = re.compile(r"^<!--\s*(?P<kind>[a-z][a-z ]*?)\s*:\s*(?P<value>.*?)\s*-->", re.S | re.M)
COMMENT = re.compile(r"^<!--.*?-->", re.S | re.M)
MARKER_KINDS = {"example", "excerpt", "not run"}
#: the shortest reason a ``not run`` marker may give
MIN_REASON_WORDS = 3


@dataclass
class Block:
    document: Path
    line: int  # of the opening fence, 1-based
    info: str
    code: str
    marker: tuple[str, str] | None  # (kind, value) of the comment before it

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"

    @property
    def is_python(self) -> bool:
        return self.info.split(" ", 1)[0] in {"python", "py", "python3"}


@dataclass
class Example:
    name: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def script(self) -> str:
        parts = [f"# --- {block.where}\n{block.code}" for block in self.blocks]
        return "\n".join(parts)


def code_blocks(document: Path) -> list[Block]:
    """Every fenced block of ``document``, with the marker comment between it and the previous block."""
    lines = document.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    between: list[str] = []  # the text since the previous block closed
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            between.append(lines[i])
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^ *{re.escape(fence)}\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        markers = [(m["kind"], m["value"]) for m in MARKER.finditer("\n".join(between))]
        assert len(markers) <= 1, f"{document.name}:{i + 1}: two marker comments before one block"
        marker = markers[0] if markers else None
        blocks.append(Block(document, i + 1, opening["info"].strip(), "\n".join(body) + "\n", marker))
        between = []
        i = j + 1
    return blocks


def python_blocks() -> list[Block]:
    return [block for document in DOCUMENTS for block in code_blocks(document) if block.is_python]


def examples() -> list[Example]:
    """The runnable examples: each unmarked block alone, and each named group of a page as one."""
    found: dict[str, Example] = {}
    for block in python_blocks():
        kind, value = block.marker or ("", "")
        if kind in {"not run", "excerpt"}:
            continue
        name = f"{block.document.name}:{value}" if kind == "example" else block.where
        found.setdefault(name, Example(name)).blocks.append(block)
    return list(found.values())


# --- the markers ------------------------------------------------------------------------------------------


def test_every_marker_is_known_and_says_why() -> None:
    problems = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for comment in COMMENT.finditer(text):
            marker = MARKER.fullmatch(comment[0])
            line = text[: comment.start()].count("\n") + 1
            where = f"{document.relative_to(ROOT)}:{line}"
            if marker is None or marker["kind"] not in MARKER_KINDS:
                problems.append(f"{where}: not a marker this test knows: {comment[0]!r}")
            elif marker["kind"] == "not run" and len(marker["value"].split()) < MIN_REASON_WORDS:
                problems.append(f"{where}: `not run` must say why (a few words): {comment[0]!r}")
            elif marker["kind"] == "example" and not re.fullmatch(r"[a-z0-9-]+", marker["value"]):
                problems.append(f"{where}: an example's name is lowercase words with dashes")
    assert problems == []


def test_every_marker_is_before_a_python_block() -> None:
    """A marker applies to the next code block: a marker before a shell block, or before nothing, is
    a mistake (the Python block it was meant for would run, or be skipped, unnoticed)."""
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        blocks = code_blocks(document)
        marked = sum(1 for block in blocks if block.marker)
        assert marked == len(COMMENT.findall(text)), f"{document.name}: a marker is not before a code block"
        for block in blocks:
            assert block.marker is None or block.is_python, f"{block.where}: a marker before a non-Python one"


def test_the_scan_finds_the_examples() -> None:
    names = {example.name for example in examples()}
    readme = [example for example in examples() if example.blocks[0].document.name == "README.md"]
    assert readme, "the README's quick start is not run"
    assert "getting-started.md:first-service" in names
    assert len(examples()) >= 4


# --- running them -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", examples(), ids=lambda example: example.name)
def test_example_runs(example: Example, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(example.script, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{example.name} failed:\n{result.stdout}\n{result.stderr}"


def normalised(line: str) -> str:
    """A code line without its indentation and trailing comment (a ``#`` outside quotes, roughly)."""
    return re.sub(r"\s+#(?=[^\"']*$).*$", "", line).strip()


@pytest.mark.parametrize(
    "block",
    [block for block in python_blocks() if block.marker and block.marker[0] == "excerpt"],
    ids=lambda block: block.where,
)
def test_excerpt_matches_its_files(block: Block) -> None:
    assert block.marker is not None
    paths = block.marker[1].split()
    for path in paths:
        assert (ROOT / path).is_file(), f"{block.where}: no file {path}"
    lines = {normalised(line) for path in paths for line in (ROOT / path).read_text().splitlines()}
    code = [normalised(line) for line in block.code.splitlines()]
    missing = [line for line in code if line and not line.startswith("#") and line not in lines]
    assert missing == [], f"{block.where}: lines not in {paths}"


# --- the outbox command lines -----------------------------------------------------------------------------


def command_lines() -> list[tuple[str, str]]:
    """``(where, command line)`` for every ``outbox ...`` line of a shell block, and every inline code
    span that starts with ``outbox `` followed by a command name."""
    found = []
    commands = set(outbox_command.commands)
    for document in DOCUMENTS:
        for block in code_blocks(document):
            if block.is_python or block.info not in {"", "sh", "shell", "bash", "console"}:
                continue
            text = block.code.replace("\\\n", " ")
            for line in text.splitlines():
                line = line.strip().removeprefix("$ ")
                if line.startswith("outbox "):
                    found.append((block.where, line))
        text = document.read_text(encoding="utf-8")
        for span in re.finditer(r"`(outbox [^`]+)`", text):
            words = span[1].split()
            if words[1] in commands or words[1].startswith("-"):
                line = text[: span.start()].count("\n") + 1
                found.append((f"{document.relative_to(ROOT)}:{line}", span[1]))
    return found


def option_names(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        names.update(param.opts + param.secondary_opts)
    return names


def unknown_flags(line: str) -> list[str]:
    """The ``--flags`` of an ``outbox ...`` line that its command (or a group above it) does not have."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    chain: list[click.Command] = [outbox_command]
    unknown = []
    for word in words[1:]:
        current = chain[-1]
        if isinstance(current, click.Group) and word in current.commands:
            chain.append(current.commands[word])
        elif re.fullmatch(r"--[a-z][a-z0-9-]*\*?(=.*)?", word):
            flag = word.split("=", 1)[0]
            known = set().union(*(option_names(command) for command in chain))
            if flag.endswith("*"):  # `--kafka-sasl-*`: some option starts so
                if not any(name.startswith(flag[:-1]) for name in known):
                    unknown.append(flag)
            elif flag not in known:
                unknown.append(flag)
    return unknown


def test_the_command_lines_are_found() -> None:
    lines = [line for _, line in command_lines()]
    assert any(line.startswith("outbox relay --database-url") for line in lines)
    assert any(line.startswith("outbox consume") for line in lines)


def test_every_outbox_command_line_uses_options_the_command_has() -> None:
    problems = [
        f"{where}: {line!r}: {flags}" for where, line in command_lines() if (flags := unknown_flags(line))
    ]
    assert problems == []


#: flags in the docs that belong to another program than ``outbox``: {flag: the file that defines it}
OTHER_PROGRAMS_FLAGS = {"--bootstrap": "examples/kafka/run.py", "--keep": "examples/kafka/run.py"}


def all_commands(command: click.Command) -> list[click.Command]:
    found = [command]
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            found += all_commands(sub)
    return found


def test_every_flag_the_docs_name_exists() -> None:
    """A ``--flag`` in backquotes anywhere in the README or docs/ (prose included) is an option of some
    ``outbox`` command (``--kafka-sasl-*``: of one that starts so), or of the program named above."""
    known = set().union(*(option_names(command) for command in all_commands(outbox_command)))
    for flag, path in OTHER_PROGRAMS_FLAGS.items():
        assert flag in (ROOT / path).read_text(), f"{flag} is not in {path}"
    problems = []
    for document in DOCUMENTS[:-1]:  # BENCHMARKS.md names the benchmark's own flags
        for match in re.finditer(r"`(--[a-z][a-z0-9-]*)(\*?)", document.read_text(encoding="utf-8")):
            flag, wildcard = match[1], match[2]
            ok = any(name.startswith(flag) for name in known) if wildcard else flag in known
            if not ok and flag not in OTHER_PROGRAMS_FLAGS:
                problems.append(f"{document.name}: {flag}{wildcard}")
    assert problems == []


def test_the_flag_check_catches_a_wrong_flag() -> None:
    assert unknown_flags("outbox relay --app myapp --batch-size 5") == []
    assert unknown_flags("outbox relay --bach-size 5") == ["--bach-size"]
    assert unknown_flags("outbox db upgrade --dry-run") == ["--dry-run"]
    assert unknown_flags("outbox relay --kafka-sasl-*") == []


# --- the site ---------------------------------------------------------------------------------------------


def build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MKDOCS_BUILD, "--config-file", str(config), "--site-dir", str(site)],
        cwd=ROOT,
        env=BUILD_ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    result = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    cli = (tmp_path / "site" / "cli" / "index.html").read_text(encoding="utf-8")
    for command in ("outbox relay", "outbox db upgrade", "outbox dlq replay", "outbox doctor"):
        assert f"Usage: {command} [OPTIONS]" in cli, command
    assert "--max-in-flight-bytes" in cli
    benchmarks = tmp_path / "site" / "benchmarks" / "index.html"
    assert "Figures behind the code" in benchmarks.read_text(encoding="utf-8")
    assert (tmp_path / "site" / "bench" / "results" / "results.png").is_file()


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load(
        "\n".join(line for line in (ROOT / "mkdocs.yml").read_text().splitlines() if "!!python" not in line)
    )
    in_nav = {next(iter(entry.values())) for entry in config["nav"]}
    pages = {path.name for path in (ROOT / "docs").glob("*.md")} | {"cli.md", "benchmarks.md"}
    assert in_nav == pages


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    """Strict really is strict: a link to a missing page, and one to a missing repository file."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    page = docs / "getting-started.md"
    page.write_text(page.read_text() + "\n[gone](no-such-page.md), [gone too](../examples/no_such_file.py)\n")
    config = (ROOT / "mkdocs.yml").read_text()
    config = config.replace("docs_dir: docs", f"docs_dir: {docs}")
    config = config.replace("tools/mkdocs_hooks.py", str(ROOT / "tools" / "mkdocs_hooks.py"))
    (tmp_path / "mkdocs.yml").write_text(config)
    result = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "no-such-page.md" in output and "no_such_file.py" in output
