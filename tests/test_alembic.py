"""A project whose schema Alembic manages: the recipe of ``docs/alembic.md``, run as it is written.

The project's files are read from the doc's code blocks (each under a line naming its path), so the doc
cannot say one thing while the test runs another. Alembic runs as its CLI, in a subprocess, as a user
runs it: ``alembic upgrade head`` gives a database a relay accepts and delivers from, ``alembic check``
(autogenerate) finds nothing to do, a new outbox schema version arrives as one more revision, and
``alembic downgrade base`` removes everything.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import outbox
from consumers import Registry
from outbox import Message
from outbox._errors import SchemaError
from outbox._schema import SCHEMA_VERSION, check_version, current_version
from outbox.alembic import exclude_outbox
from relay import Relay
from tests.conftest import ROOT, make_database, wait_until
from tests.test_schema import PARTIAL, index_definitions, install_v2

DOC = ROOT / "docs" / "alembic.md"
NEW_VERSION_REVISION = "migrations/versions/0002_outbox_upgrade.py"
OUTBOX_TABLES = {
    "outbox",
    "outbox_locks",
    "outbox_meta",
    "outbox_inbox",
    "outbox_dead_letters",
    "outbox_relays",
    "outbox_stats",
    "outbox_audit",
}


def recipe() -> dict[str, str]:
    """``{path: text}`` of every code block in docs/alembic.md that a line naming its path introduces."""
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"^`([\w./]+\.\w+)`(?:[^\n]*):\n\n```\w*\n(.*?)^```$", text, re.M | re.S)
    return dict(blocks)


def write_project(root: Path, *, skip: tuple[str, ...] = ()) -> Path:
    for path, text in recipe().items():
        if path not in skip:
            add_file(root, path, text)
    return root


def add_file(root: Path, path: str, text: str) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(text, encoding="utf-8")


def alembic(project: Path, db_url: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the ``alembic`` command in ``project`` against ``db_url``; fail the test if it fails and ``ok``."""
    env = {**os.environ, "OUTBOX_DATABASE_URL": db_url}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if ok:
        assert result.returncode == 0, f"alembic {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def table_names(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names())


def assert_delivered(engine: sa.Engine, topic: str, expected: list[object]) -> None:
    """A relay on ``engine`` hands the messages of ``topic`` to a handler (proof the relay accepts it)."""
    registry = Registry()
    received: list[object] = []

    @registry.handler(topic)
    def handle(message: Message) -> None:
        received.append(message.payload)

    with Relay(engine, registry, poll_interval=0.05):
        wait_until(lambda: len(received) >= len(expected), timeout=30, what=f"{topic} delivered")
    assert received == expected


def place_order(engine: sa.Engine, order_id: int) -> None:
    """The business transaction: an order and its message, committed together."""
    orders = sa.table("orders", sa.column("id"), sa.column("customer"), sa.column("total"))
    with engine.begin() as conn:
        conn.execute(sa.insert(orders).values(id=order_id, customer="ada", total="24.60"))
        outbox.add(conn, "order.created", {"order_id": order_id}, key="customer-ada")


def test_the_doc_holds_the_whole_project() -> None:
    assert sorted(recipe()) == [
        "alembic.ini",
        "migrations/env.py",
        "migrations/versions/0001_orders_and_outbox.py",
        NEW_VERSION_REVISION,
        "myapp/models.py",
    ]


def test_alembic_creates_the_outbox_a_relay_delivers_from(db_url: str, tmp_path: Path) -> None:
    project = write_project(tmp_path / "project")
    alembic(project, db_url, "upgrade", "head")
    engine = outbox.create_engine(db_url)
    try:
        assert table_names(engine) == {"alembic_version", "orders", *OUTBOX_TABLES}
        with engine.connect() as conn:
            check_version(conn)  # the version row is there: the relay's own check
        place_order(engine, 42)
        assert_delivered(engine, "order.created", [{"order_id": 42}])

        checked = alembic(project, db_url, "check")
        assert "No new upgrade operations detected" in checked.stdout + checked.stderr

        alembic(project, db_url, "downgrade", "base")
        assert table_names(engine) == {"alembic_version"}
    finally:
        engine.dispose()


def test_a_new_outbox_schema_version_arrives_as_a_revision(db_url: str, tmp_path: Path) -> None:
    """A database the first revision made under an older release (schema version 2) is brought to this
    release's version by the doc's second revision, its messages kept, and autogenerate stays quiet."""
    project = write_project(tmp_path / "project", skip=(NEW_VERSION_REVISION,))
    alembic(project, db_url, "upgrade", "head")
    engine = outbox.create_engine(db_url)
    try:
        with engine.begin() as conn:  # what revision 0001 made with an outbox release of schema version 2
            outbox.tables_for().metadata.drop_all(conn)
            install_v2(conn)
        place_order(engine, 7)
        with engine.connect() as conn, pytest.raises(SchemaError, match="run `outbox db upgrade`"):
            check_version(conn)

        add_file(project, NEW_VERSION_REVISION, recipe()[NEW_VERSION_REVISION])
        alembic(project, db_url, "upgrade", "head")
        with engine.connect() as conn:
            assert current_version(conn) == SCHEMA_VERSION
            names = {index["name"] for index in sa.inspect(conn).get_indexes("outbox")}
            if engine.dialect.name == "postgresql":  # versions 3 and 4: partial indexes, the holding one
                definitions = index_definitions(conn)
                assert all(" WHERE " in definitions[name] for name in PARTIAL), definitions
                assert "ix_outbox_holding" in definitions
            else:
                assert names >= PARTIAL and "ix_outbox_holding" not in names
        assert_delivered(engine, "order.created", [{"order_id": 7}])
        alembic(project, db_url, "check")

        alembic(project, db_url, "downgrade", "base")
        assert table_names(engine) == {"alembic_version"}
    finally:
        engine.dispose()


def test_autogenerate_leaves_the_outbox_alone_even_with_its_metadata(engine: sa.Engine) -> None:
    """With ``exclude_outbox()``, the outbox tables are out of the comparison on both sides: listing
    ``outbox.metadata_for()`` in ``target_metadata`` neither recreates nor alters them (the holding
    index, PostgreSQL's alone, would otherwise be created on the others). Without it, autogenerate
    would drop them."""
    models = sa.MetaData()
    seen: list[str | None] = []

    def own_filter(item: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
        seen.append(name)
        return True

    with engine.connect() as conn:
        conn.execute(sa.text("CREATE TABLE notes (id INTEGER NOT NULL PRIMARY KEY)"))
        sa.Table("notes", models, sa.Column("id", sa.Integer, primary_key=True, autoincrement=False))
        filtered = MigrationContext.configure(
            conn, opts={"include_object": exclude_outbox(include_object=own_filter)}
        )
        assert compare_metadata(filtered, [models, outbox.metadata_for()]) == []
        assert "notes" in seen and not OUTBOX_TABLES & set(seen)

        unfiltered = MigrationContext.configure(conn)
        dropped = {diff[1].name for diff in compare_metadata(unfiltered, models) if diff[0] == "remove_table"}
        assert dropped == OUTBOX_TABLES


def test_exclude_outbox_knows_the_tables_of_each_outbox_named() -> None:
    include = exclude_outbox("outbox", "shop_outbox")
    for name in ("outbox", "outbox_meta", "shop_outbox", "shop_outbox_dead_letters"):
        assert not include(sa.Table(name, sa.MetaData()), name, "table", True, None)
    assert include(sa.Table("orders", sa.MetaData()), "orders", "table", True, None)
    index = outbox.tables_for("shop_outbox").messages.indexes.copy().pop()
    assert not include(index, index.name, "index", False, None)


def test_offline_mode_is_refused_with_the_reason(tmp_path: Path) -> None:
    db_url, _ = make_database("sqlite", tmp_path)
    project = write_project(tmp_path / "project")
    result = alembic(project, db_url, "upgrade", "head", "--sql", ok=False)
    assert result.returncode != 0
    assert "offline mode (--sql)" in result.stderr


def test_outbox_needs_no_alembic() -> None:
    """Alembic is an optional extra: the packages, ``outbox.alembic`` included, import without it."""
    code = (
        "import sys; sys.modules['alembic'] = None\n"
        "import outbox, outbox.alembic, outbox.cli, relay, consumers\n"
        "print('alembic' in sys.modules and sys.modules['alembic'] is not None)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
