"""MkDocs hooks of the documentation site (``hooks:`` in mkdocs.yml; ``make docs`` builds it).

Two things plain MkDocs cannot do:

- **The CLI reference is generated.** The page ``cli.md`` is rendered at build time from the click
  commands themselves (the help of ``outbox`` and of every subcommand), so it cannot drift from the
  code: there is no file to forget to update.
- **Files of the repository outside docs/.** ``BENCHMARKS.md`` stays at the repository root, where the
  code's docstrings and ``bench/`` point to it, and becomes the site's page ``benchmarks.md``. A page
  links to a repository file as GitHub resolves it (``../examples/kafka/run.py`` from a page of docs/,
  ``bench/results/results.png`` from BENCHMARKS.md); the hook copies that file into the site and points
  the link at the copy, so the same link works on GitHub and in the site. A link to a repository
  directory becomes its plain text (the site has no page for it), and a link to a path that does not
  exist is reported as a warning, which fails ``mkdocs build --strict`` like any broken link.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = "docs"
#: pages of the site whose file lives elsewhere in the repository: {repository path: site path}
PAGES_FROM_REPOSITORY = {"BENCHMARKS.md": "benchmarks.md"}
CLI_PAGE = "cli.md"
#: the width the help is wrapped at: fixed, so the page does not depend on the terminal that built it
HELP_WIDTH = 100
#: an inline link or image: [text](target) or ![alt](target), target without spaces or a title
LINK = re.compile(r"(?P<image>!?)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)\)")

log = logging.getLogger("mkdocs.hooks.outbox")


# --- the CLI reference ------------------------------------------------------------------------------------


def cli_reference() -> str:
    """The page: ``outbox --help`` and the help of every command under it, as the command prints it."""
    from outbox.cli import outbox  # the click group (internal); imported here so mkdocs.yml loads fast

    sections = [
        "# CLI reference",
        "",
        "Generated at build time from the `outbox` command itself (its click definitions), so it always",
        "matches the installed code: each section is what `outbox ... --help` prints. The settings, exit",
        "codes and passwords are explained on [Operations](operations.md#the-cli).",
        "",
    ]
    root = click.Context(
        outbox,
        info_name="outbox",
        terminal_width=HELP_WIDTH,
        max_content_width=HELP_WIDTH,
        **outbox.context_settings,
    )
    for path, ctx in _commands(root):
        sections += [f"## `{path}`", "", "```text", ctx.get_help().rstrip(), "```", ""]
    return "\n".join(sections)


def _commands(ctx: click.Context) -> list[tuple[str, click.Context]]:
    """``(command path, its context)`` for ``ctx``'s command and every command below it, depth first."""
    found = [(ctx.command_path, ctx)]
    command = ctx.command
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                found += _commands(click.Context(sub, info_name=name, parent=ctx))
    return found


# --- repository files in the site -------------------------------------------------------------------------


def _repository_path(src_uri: str) -> str:
    """Where the page whose site path is ``src_uri`` lives in the repository."""
    for repository_path, site_path in PAGES_FROM_REPOSITORY.items():
        if src_uri == site_path:
            return repository_path
    return f"{DOCS_DIR}/{src_uri}"


def _site_path(repository_path: str) -> str:
    """Where a repository file is in the site: a page of docs/, a page brought in, or a copy."""
    if repository_path.startswith(f"{DOCS_DIR}/"):
        return repository_path[len(DOCS_DIR) + 1 :]
    return PAGES_FROM_REPOSITORY.get(repository_path, repository_path)


def _is_relative(target: str) -> bool:
    return not re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", target, re.I)


def _outside_docs(src_uri: str, target: str) -> str | None:
    """The repository path a relative link of the page ``src_uri`` points to, when that is outside
    docs/ (``None`` for links within docs/, anchors and URLs)."""
    if not _is_relative(target):
        return None
    path = target.split("#", 1)[0]
    here = posixpath.dirname(_repository_path(src_uri))
    resolved = posixpath.normpath(posixpath.join(here, path))
    if resolved.startswith(f"{DOCS_DIR}/") or resolved == DOCS_DIR:
        return None
    return resolved


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for repository_path, site_path in PAGES_FROM_REPOSITORY.items():
        files.append(File.generated(config, site_path, abs_src_path=str(ROOT / repository_path)))
    files.append(File.generated(config, CLI_PAGE, content=cli_reference()))

    # Copy every repository file a page links to (outside docs/) into the site, at its repository path.
    pages = [file for file in files if file.src_uri.endswith(".md") and file.abs_src_path]
    for page in pages:
        text = Path(page.abs_src_path).read_text(encoding="utf-8")
        for match in LINK.finditer(text):
            target = _outside_docs(page.src_uri, match["target"])
            if target is None or target in PAGES_FROM_REPOSITORY or not (ROOT / target).is_file():
                continue
            if files.get_file_from_path(target) is None:
                files.append(File.generated(config, target, abs_src_path=str(ROOT / target)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    src_uri = page.file.src_uri

    def relink(match: re.Match[str]) -> str:
        target = _outside_docs(src_uri, match["target"])
        if target is None:
            return match[0]
        if (ROOT / target).is_dir():
            return match["text"]  # a folder of the repository: the site has no page for it
        if not (ROOT / target).is_file():
            log.warning("%s links to %r, which is not a file of the repository", src_uri, match["target"])
            return match[0]
        anchor = match["target"][len(match["target"].split("#", 1)[0]) :]
        start = posixpath.dirname(src_uri) or "."
        new = posixpath.relpath(_site_path(target), start) + anchor
        return f"{match['image']}[{match['text']}]({new})"

    return LINK.sub(relink, markdown)
