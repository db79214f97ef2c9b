"""The ``outbox`` command as operators use it: settings from flags, environment and file; the operate
commands' output; one-line errors with the documented exit codes; ``outbox relay`` as a real process.

Fast checks drive the CLI in-process with click's ``CliRunner`` (which goes through the same
``OutboxGroup.main`` as the console script); the guarantees about what a user sees on a mistake, and
the relay's signal handling, run ``python -m outbox`` as subprocesses.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

import outbox
from outbox import cli
from outbox._clock import utcnow
from outbox._schema import SCHEMA_VERSION, Status, tables_for
from outbox.cli import _config as config
from outbox.cli._config import Settings, parse_duration, parse_time_ref
from tests.conftest import ROOT, status_counts, wait_until

T = tables_for().messages
APP = "tests.apps.cli_app:registry"
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


@pytest.fixture(autouse=True)
def _no_outbox_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own OUTBOX_* variables must not leak into what these tests configure."""
    for name in list(os.environ):
        if name.startswith("OUTBOX_"):
            monkeypatch.delenv(name)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.outbox, list(args), env=env, catch_exceptions=False)


def run_outbox(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox", *args],
        cwd=ROOT,
        env=_child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(extra or {})
    return env


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("outbox: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


def add(engine: sa.Engine, topic: str = "cli.ok", payload: Any = None, **kwargs: Any) -> uuid.UUID:
    with engine.begin() as conn:
        return outbox.add(conn, topic, {"n": 1} if payload is None else payload, **kwargs)


def set_status(engine: sa.Engine, ids: list[uuid.UUID], status: Status, **values: Any) -> None:
    if status in (Status.DEAD, Status.PARKED, Status.DELIVERED):
        values.setdefault("due_at", None)
    with engine.begin() as conn:
        conn.execute(sa.update(T).where(T.c.id.in_(ids)).values(status=status.value, **values))


# --- settings -----------------------------------------------------------------------------------------------


def test_settings_come_from_flag_then_environment_then_file_then_defaults(tmp_path: Path) -> None:
    config = tmp_path / "outbox.toml"
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    config.write_text(f'database_url = "{url}"\ntable = "from_file"\nbatch_size = 500\n')

    def table(*args: str, env: dict[str, str] | None = None) -> str:
        result = invoke(*args, env={"OUTBOX_CONFIG": str(config), **(env or {})})
        assert result.exit_code == 0, result.output
        return str(json.loads(result.stdout)["table"])

    assert table("db", "version", "--json") == "from_file"
    assert table("db", "version", "--json", env={"OUTBOX_TABLE": "from_env"}) == "from_env"
    assert (
        table("--table", "from_group", "db", "version", "--json", env={"OUTBOX_TABLE": "from_env"})
        == "from_group"
    )
    assert table("--table", "from_group", "db", "version", "--json", "--table", "from_cmd") == "from_cmd"

    settings = Settings.load({"workers": 3}, config_file=config)
    assert (settings.table, settings.batch_size, settings.workers, settings.lease_seconds) == (
        "from_file",
        500,
        3,
        30.0,
    )
    secret = Settings.load({"database_url": "postgresql://user:s3cret@db/x"})
    assert "s3cret" not in repr(secret) and "database_url" not in repr(secret)


def test_invalid_settings_name_the_setting_and_the_fix(tmp_path: Path) -> None:
    url = "postgresql://u:pw@db/x"
    with pytest.raises(outbox.ConfigError, match=r"batch_size 0: .*--batch-size, OUTBOX_BATCH_SIZE"):
        Settings.load({"database_url": url, "batch_size": 0})
    with pytest.raises(
        outbox.ConfigError, match=r"max_batch_size 100: must not be smaller than batch_size \(200\)"
    ):
        Settings.load({"database_url": url, "max_batch_size": 100})
    with pytest.raises(outbox.ConfigError, match="backoff_max"):
        Settings.load({"database_url": url, "backoff_initial": 10.0, "backoff_max": 1.0})
    with pytest.raises(outbox.ConfigError, match="invalid outbox table name"):
        Settings.load({"database_url": url, "table": "drop table;"})
    with pytest.raises(outbox.ConfigError, match="no database URL"):
        Settings.load({})
    bad = tmp_path / "bad.toml"
    for text, expected in [
        ("batch_sise = 5", "unknown setting 'batch_sise'"),
        ('workers = "many"', "workers .* must be a whole number"),
        ("workers = [", "not valid TOML"),
    ]:
        bad.write_text(text)
        with pytest.raises(outbox.ConfigError, match=expected):
            Settings.load({"database_url": url}, config_file=bad)
    with pytest.raises(outbox.ConfigError, match="not found"):
        Settings.load({"database_url": url}, config_file=tmp_path / "missing.toml")
    bad.write_text('strict_order_topic = ["a", "b"]\nhandler_timeout = 5\n')
    settings = Settings.load({"database_url": url}, config_file=bad)
    assert settings.strict_order_topics == ("a", "b") and settings.handler_timeout == 5.0
    assert settings.masked_url == "postgresql://u:***@db/x"


def test_durations_and_times() -> None:
    assert parse_duration("30s") == dt.timedelta(seconds=30)
    assert parse_duration("10m") == dt.timedelta(minutes=10)
    assert parse_duration("2h") == dt.timedelta(hours=2)
    assert parse_duration("7d") == dt.timedelta(days=7)
    assert parse_duration("1.5h") == dt.timedelta(minutes=90)
    for bad in ("", "7 days ago", "-1d", "d", "5y"):
        with pytest.raises(outbox.ConfigError, match="invalid duration"):
            parse_duration(bad)
    now = dt.datetime(2024, 5, 1, 12, 0)
    assert parse_time_ref("2h", now=now) == dt.datetime(2024, 5, 1, 10, 0)
    assert parse_time_ref("2024-04-30T08:00", now=now) == dt.datetime(2024, 4, 30, 8, 0)
    assert parse_time_ref("2024-04-30T08:00+02:00", now=now) == dt.datetime(2024, 4, 30, 6, 0)
    with pytest.raises(outbox.ConfigError, match="invalid time"):
        parse_time_ref("yesterday", now=now)


# --- db -----------------------------------------------------------------------------------------------------


def test_db_upgrade_applies_once_then_reports_the_version(db_url: str) -> None:
    first = invoke("db", "upgrade", "--database-url", db_url)
    assert first.exit_code == 0, first.output
    assert "applied migration 1" in first.stdout
    second = invoke("db", "upgrade", "--json", env={"OUTBOX_DATABASE_URL": db_url})
    assert second.exit_code == 0 and json.loads(second.stdout) == {
        "table": "outbox",
        "applied": [],
        "version": SCHEMA_VERSION,
    }
    version = invoke("db", "version", "--check", "--database-url", db_url)
    assert version.exit_code == 0 and f"installed: {SCHEMA_VERSION}" in version.stdout


@sqlite_only
def test_db_version_check_fails_on_a_database_without_the_table(db_url: str) -> None:
    result = invoke("db", "version", "--check", "--database-url", db_url)
    assert result.exit_code == cli.RET_SCHEMA
    assert "installed: 0" in result.stdout
    assert_one_line_error(result.stderr, "outbox db upgrade")


# --- status, list, show -------------------------------------------------------------------------------------


@sqlite_only
def test_status_list_and_show(engine: sa.Engine, db_url: str) -> None:
    env = {"OUTBOX_DATABASE_URL": db_url}
    ok = [add(engine, payload={"i": i}, key="k") for i in range(3)]
    dead = add(engine, "cli.fail", {"why": "poison"}, headers={"trace": "abc"})
    set_status(engine, [dead], Status.DEAD, attempts=1, last_error="RuntimeError: poison\n  at line 3")
    set_status(engine, ok[:1], Status.DELIVERED, delivered_at=utcnow())

    human = invoke("status", env=env)
    assert human.exit_code == 0, human.output
    assert "4 message(s)" in human.stdout and "cli.fail" in human.stdout
    report = json.loads(invoke("status", "--json", env=env).stdout)
    assert (
        report["counts"]["pending"] == 2
        and report["counts"]["dead"] == 1
        and report["counts"]["delivered"] == 1
    )
    assert report["topics"] == {"cli.fail": {"dead": 1}, "cli.ok": {"delivered": 1, "pending": 2}}

    listed = json.loads(invoke("list", "--json", "--status", "dead", env=env).stdout)
    assert [m["id"] for m in listed] == [str(dead)] and listed[0]["last_error"].startswith("RuntimeError")
    page = json.loads(invoke("list", "--json", "--limit", "2", "--order", "asc", env=env).stdout)
    rest = json.loads(
        invoke("list", "--json", "--order", "asc", "--after", str(page[-1]["seq"]), env=env).stdout
    )
    assert [m["id"] for m in page + rest] == [str(i) for i in [*ok, dead]]
    table = invoke("list", "--topic", "cli.*", "--key", "k", "--limit", "2", env=env)
    assert table.exit_code == 0 and str(ok[2]) in table.stdout and str(dead) not in table.stdout
    assert "--after" in table.stdout  # a full page says how to get the next one

    shown = invoke("show", str(dead), env=env)
    assert shown.exit_code == 0, shown.output
    for text in ("status:           dead", '"why": "poison"', "at line 3", '{"trace": "abc"}'):
        assert text in shown.stdout
    assert json.loads(invoke("show", "--json", str(dead), env=env).stdout)["payload"] == {"why": "poison"}


@sqlite_only
def test_show_of_an_unknown_or_invalid_id(engine: sa.Engine, db_url: str) -> None:
    missing = invoke("show", str(uuid.uuid4()), "--database-url", db_url)
    assert missing.exit_code == cli.RET_NOT_FOUND
    assert_one_line_error(missing.stderr, "no message with id")
    invalid = invoke("show", "not-a-uuid", "--database-url", db_url)
    assert invalid.exit_code == cli.RET_USAGE
    assert_one_line_error(
        invalid.stderr, "'not-a-uuid' is neither a SEQ (a whole number", "nor a message id (a UUID"
    )
    unknown_seq = invoke("show", "999", "--database-url", db_url)
    assert unknown_seq.exit_code == cli.RET_NOT_FOUND
    assert_one_line_error(unknown_seq.stderr, "no message with seq 999")


@sqlite_only
def test_show_and_replay_take_the_seq_that_list_shows(engine: sa.Engine, db_url: str) -> None:
    """Issue 17: `outbox show 207` refused the SEQ that `outbox list` prints in its first column."""
    env = {"OUTBOX_DATABASE_URL": db_url}
    first, dead = add(engine, payload={"i": 1}), add(engine, "cli.fail", {"why": "poison"})
    set_status(engine, [dead], Status.DEAD, attempts=3, last_error="boom")
    listed = invoke("list", "--status", "dead", env=env)
    seq = listed.stdout.splitlines()[1].split()[0]  # the first column of the first row
    assert seq.isdigit() and seq != "1", listed.stdout

    shown = invoke("show", seq, env=env)
    assert shown.exit_code == 0, shown.output
    assert f"id:               {dead}" in shown.stdout and f"seq:              {seq}" in shown.stdout
    assert json.loads(invoke("show", "--json", seq, env=env).stdout)["id"] == str(dead)

    dry = invoke("replay", seq, "--dry-run", "--json", env=env)  # SEQs and ids may be mixed
    assert json.loads(dry.stdout)["ids"] == [str(dead)]
    both = invoke("replay", seq, str(first), "--json", env=env)
    assert both.exit_code == 0, both.output
    assert json.loads(both.stdout)["ids"] == [str(dead)]
    assert status_counts(engine) == {"pending": 2}
    missing = invoke("replay", seq, "12345", env=env)
    assert missing.exit_code == cli.RET_NOT_FOUND
    assert_one_line_error(missing.stderr, "no message with seq 12345")


# --- replay and purge ---------------------------------------------------------------------------------------


@sqlite_only
def test_replay_by_filter_with_dry_run_then_for_real(engine: sa.Engine, db_url: str) -> None:
    env = {"OUTBOX_DATABASE_URL": db_url}
    dead = [add(engine, "cli.fail") for _ in range(3)]
    failed = add(engine, "cli.fail")
    other = add(engine, "cli.other")
    set_status(engine, [*dead, other], Status.DEAD, attempts=3, last_error="boom")
    set_status(engine, [failed], Status.FAILED, attempts=1, last_error="later")

    dry = invoke("replay", "--topic", "cli.fail", "--dry-run", "--json", env=env)
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout) == {
        "dry_run": True,
        "count": 3,
        "ids": [str(i) for i in dead],
        "skipped": [],
    }
    assert status_counts(engine) == {"dead": 4, "failed": 1}

    real = invoke("replay", "--topic", "cli.fail", env=env)
    assert real.exit_code == 0 and "replayed 3 message(s)" in real.stdout
    assert status_counts(engine) == {"pending": 3, "dead": 1, "failed": 1}

    by_id = invoke("replay", str(failed), str(dead[0]), env=env)
    assert by_id.exit_code == 0 and "replayed 1 message(s)" in by_id.stdout
    assert f"skipped {dead[0]} (pending: not replayable)" in by_id.stderr


@sqlite_only
def test_replay_refuses_ambiguous_or_unsafe_requests(engine: sa.Engine, db_url: str) -> None:
    env = {"OUTBOX_DATABASE_URL": db_url}
    delivered = add(engine)
    set_status(engine, [delivered], Status.DELIVERED)
    cases = [
        (("replay",), "nothing selected"),
        (("replay", str(delivered), "--topic", "x"), "not both"),
        (("replay", "--status", "delivered"), "--include-delivered"),
        (("replay", "--status", "inflight"), "'inflight' is not one of"),
    ]
    for args, fragment in cases:
        result = invoke(*args, env=env)
        assert result.exit_code == cli.RET_USAGE, (args, result.output)
        assert_one_line_error(result.stderr, fragment)
    assert status_counts(engine) == {"delivered": 1}
    result = invoke("replay", "--status", "delivered", "--include-delivered", "--json", env=env)
    assert json.loads(result.stdout)["ids"] == [str(delivered)]


@sqlite_only
def test_purge_counts_on_dry_run_and_deletes_only_old_finished_messages(
    engine: sa.Engine, db_url: str
) -> None:
    env = {"OUTBOX_DATABASE_URL": db_url}
    long_ago = utcnow() - dt.timedelta(days=10)
    delivered = [add(engine) for _ in range(3)]
    pending = add(engine)
    set_status(engine, delivered, Status.DELIVERED, delivered_at=long_ago)
    with engine.begin() as conn:
        conn.execute(sa.update(T).values(created_at=long_ago))

    dry = invoke("purge", "--older-than", "7d", "--dry-run", "--json", env=env)
    assert dry.exit_code == 0 and json.loads(dry.stdout)["count"] == 3
    assert status_counts(engine) == {"delivered": 3, "pending": 1}
    real = invoke("purge", "--older-than", "7d", "--batch-size", "2", env=env)
    assert (
        real.exit_code == 0
        and "deleted 3 delivered message(s)" in real.stdout
        and "2 batch(es)" in real.stdout
    )
    assert status_counts(engine) == {"pending": 1}
    with engine.connect() as conn:
        assert conn.execute(sa.select(T.c.id)).scalar_one() == pending

    bad = invoke("purge", "--older-than", "a week", env=env)
    assert bad.exit_code == cli.RET_USAGE
    assert_one_line_error(bad.stderr, "invalid duration 'a week'")


@sqlite_only
def test_purge_without_an_age_says_which_option_to_add_and_deletes_nothing(
    engine: sa.Engine, db_url: str
) -> None:
    """Issue 17: `outbox purge --dry-run` failed with "Missing option '--older-than'" while the README read
    as if 7d were the default. The age stays required (a purge never picks what to delete by itself), and
    the error says what to add."""
    env = {"OUTBOX_DATABASE_URL": db_url}
    delivered = add(engine)
    set_status(engine, [delivered], Status.DELIVERED, delivered_at=utcnow() - dt.timedelta(days=30))
    for args in (("purge", "--dry-run"), ("purge",), ("purge", "--status", "dead"), ("purge", "--inbox")):
        result = invoke(*args, env=env)
        assert result.exit_code == cli.RET_USAGE, (args, result.output)
        assert_one_line_error(result.stderr, "add --older-than AGE, e.g. --older-than 7d")
    assert status_counts(engine) == {"delivered": 1}


def _times(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """Every (key, text) of a JSON document whose key names a time (``*_at``, ``now``, ``older_than``)."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _times(item, name)
    elif isinstance(value, list):
        for item in value:
            yield from _times(item, key)
    elif isinstance(value, str) and (key.endswith("_at") or key in ("now", "older_than")):
        yield key, value


@sqlite_only
def test_every_time_in_json_output_has_a_utc_offset(
    engine: sa.Engine, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 17: `"now": "2026-12-04T15:18:31.974082"` while the text said UTC; a naive ISO time is read
    as local time by most parsers. Every time of every --json output, and of JSON log lines, has its
    offset."""
    from consumers._dead_letters import DeadLetters

    env = {"OUTBOX_DATABASE_URL": db_url}
    pending = add(engine)
    dead = add(engine, "cli.fail")
    set_status(engine, [dead], Status.DEAD, attempts=3, last_error="boom", last_attempt_at=utcnow())
    delivered = add(engine)
    set_status(engine, [delivered], Status.DELIVERED, delivered_at=utcnow())
    record = SimpleNamespace(
        topic="kt", partition=0, offset=1, timestamp=0, key=None, value=b"{}", headers=[]
    )
    with engine.begin() as conn:
        letters = DeadLetters(tables_for())
        letters.add(conn, group="g", record=record, message_id=dead, error="boom", attempts=3)
        letters.mark_replayed(conn, [1], at=utcnow())
    commands = [
        ("status",),
        ("list",),
        ("show", str(dead)),
        ("show", str(delivered)),
        ("show", str(pending)),
        ("replay", str(dead), "--dry-run"),
        ("purge", "--older-than", "0s", "--dry-run"),
        ("dlq", "list"),
        ("dlq", "show", "1"),
    ]
    seen: set[str] = set()
    for args in commands:
        result = invoke(*args, "--json", env=env)
        assert result.exit_code == 0, (args, result.output)
        for key, text in _times(json.loads(result.stdout)):
            moment = dt.datetime.fromisoformat(text)
            assert moment.utcoffset() == dt.timedelta(0), (args, key, text)
            seen.add(key)
    assert seen >= {
        "now",
        "created_at",
        "due_at",
        "last_attempt_at",
        "delivered_at",
        "older_than",
        "dead_lettered_at",
        "replayed_at",
    }

    from outbox.cli._options import configure_logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        configure_logging(Settings.load({"database_url": db_url, "log_format": "json"}))
        logging.getLogger("outbox.test").warning("a line")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert dt.datetime.fromisoformat(line["time"]).utcoffset() == dt.timedelta(0), line


# --- one-line errors, as a user sees them (subprocesses) ----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (["status", "--database-url", "not a url"], cli.RET_CONFIG, ["invalid database URL"]),
        (
            ["db", "upgrade", "--database-url", "postgresql://nouser:s3cret@127.0.0.1:1/x"],
            cli.RET_CONNECT,
            ["cannot connect to the database at postgresql://nouser:***@127.0.0.1:1/x"],
        ),
        (
            ["status", "--database-url", "mysql://root:s3cret@127.0.0.1:3306/test"],
            cli.RET_CONNECT,
            ["mysql://root:***@127.0.0.1:3306/test", "Access denied"],
        ),
        (["relay", "--app", APP], cli.RET_CONFIG, ["no database URL"]),
        (
            ["relay", "--batch-size", "0", "--app", APP, "--database-url", "sqlite://"],
            cli.RET_CONFIG,
            ["batch_size"],
        ),
        (["list", "--limit", "many"], cli.RET_USAGE, ["'many' is not a valid integer"]),
    ],
)
def test_a_user_mistake_is_one_line_and_an_exit_code(
    args: list[str], code: int, fragments: list[str]
) -> None:
    result = run_outbox(*args)
    assert result.returncode == code, result.stderr
    assert_one_line_error(result.stderr, *fragments)
    assert "s3cret" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "flags",
    [
        ["--lease-seconds", "inf"],
        ["--lease-seconds", "1e12"],
        ["--poll-interval", "nan"],
        ["--stop-timeout", "inf"],
        ["--backoff-initial", "0", "--backoff-max", "inf"],
        ["--handler-timeout", "inf"],
        ["--maintenance-interval", "inf"],
        ["--metrics-interval", "inf"],
        ["--retention", "99999999999d"],
    ],
    ids=lambda flags: "=".join(flags[-2:]),
)
def test_a_setting_in_seconds_that_is_not_finite_is_refused_at_start(
    flags: list[str], tmp_path: Path
) -> None:
    """``--lease-seconds inf`` passed validation, then the claim thread died and the relay lived on,
    delivering nothing. Every number of seconds must be finite (at most 100 years): one line, exit 3."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    result = run_outbox("relay", "--app", APP, "--database-url", url, *flags)
    assert result.returncode == cli.RET_CONFIG, result.stderr
    name = flags[-2].removeprefix("--").replace("-", "_")
    assert_one_line_error(result.stderr, name, "at most")


def test_every_setting_in_seconds_refuses_inf_and_nan_from_any_source(tmp_path: Path) -> None:
    url = "sqlite://"
    seconds = [name for name, kind in config._KINDS.items() if kind in ("float", "float?")]
    assert "lease_seconds" in seconds and "handler_timeout" in seconds
    for name in seconds:
        for value in (float("inf"), float("nan"), -float("inf")):
            with pytest.raises(outbox.ConfigError, match=f"invalid {name} .*finite"):
                Settings.load({"database_url": url, name: value})
    toml = tmp_path / "inf.toml"
    too_long = 'stuck_after = "99999999999d"'
    for text in ("lease_seconds = inf", "backoff_max = nan", "retention = inf", too_long):
        toml.write_text(text + "\n")
        with pytest.raises(outbox.ConfigError, match=r"at most|finite"):
            Settings.load({"database_url": url}, config_file=toml)


def test_a_config_file_that_is_not_utf8_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """It printed a UnicodeDecodeError's traceback (exit 1)."""
    config_file = tmp_path / "latin1.toml"
    config_file.write_bytes("# caf\u00e9 in Latin-1\nbatch_size = 5\n".encode("latin-1"))
    result = run_outbox("status", "--config", str(config_file))
    assert result.returncode == cli.RET_CONFIG, result.stderr
    assert_one_line_error(result.stderr, str(config_file), "not UTF-8", "byte 0xe9", "save it as UTF-8")


def test_an_unknown_app_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    result = run_outbox("relay", "--app", "tests.apps.no_such_module", env={"OUTBOX_DATABASE_URL": url})
    assert result.returncode == cli.RET_CONFIG
    assert_one_line_error(
        result.stderr, "cannot import --app module 'tests.apps.no_such_module'", "PYTHONPATH"
    )


def test_an_app_that_registers_nothing_or_names_nothing_is_one_line(tmp_path: Path) -> None:
    """A relay with no handler and no Kafka would claim nothing (issue: it used to run, and kill every
    message with "no route"); a missing attribute is named as missing, not as "not a Registry"."""
    env = {"OUTBOX_DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}"}
    empty = run_outbox("relay", "--app", "tests.apps.recording:empty_registry", env=env)
    assert empty.returncode == cli.RET_CONFIG, empty.stderr
    assert_one_line_error(
        empty.stderr,
        "--app 'tests.apps.recording:empty_registry' registered no handler",
        "--app myapp.handlers",
    )
    missing = run_outbox("relay", "--app", "tests.apps.recording:nope", env=env)
    assert missing.returncode == cli.RET_CONFIG, missing.stderr
    assert_one_line_error(missing.stderr, "module tests.apps.recording has no attribute 'nope'")
    wrong = run_outbox("relay", "--app", "tests.apps.recording:TOPIC", env=env)
    assert wrong.returncode == cli.RET_CONFIG, wrong.stderr
    assert_one_line_error(wrong.stderr, "tests.apps.recording.TOPIC is a str, not a consumers.Registry")


def test_a_missing_table_says_to_run_db_upgrade(db_url: str) -> None:
    for args in (["relay", "--app", APP], ["status"]):
        result = run_outbox(*args, env={"OUTBOX_DATABASE_URL": db_url})
        assert result.returncode == cli.RET_SCHEMA, result.stderr
        assert_one_line_error(result.stderr, "does not exist: run `outbox db upgrade`")


# --- outbox relay as a process ------------------------------------------------------------------------------


@pytest.fixture
def relay_process(db_url: str, tmp_path: Path) -> Iterator[Any]:
    """Start ``python -m outbox relay`` on ``db_url``; the test gets a function that starts one."""
    started: list[subprocess.Popen[str]] = []

    def start(*extra: str) -> subprocess.Popen[str]:
        env = {
            "OUTBOX_DATABASE_URL": db_url,
            "OUTBOX_POLL_INTERVAL": "0.2",
            "CLI_APP_LOG": str(tmp_path / "handled"),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "outbox", "relay", "--app", APP, *extra],
            cwd=ROOT,
            env=_child_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_relay_delivers_and_exits_0_on_sigterm(engine: sa.Engine, relay_process: Any, tmp_path: Path) -> None:
    ids = [add(engine, payload={"i": i}, key=f"k{i % 2}") for i in range(5)]
    dead = add(engine, "cli.fail")
    process = relay_process("--log-format", "json", "--workers", "2")

    wait_until(lambda: status_counts(engine) == {"delivered": 5, "dead": 1}, timeout=30, what="delivery")
    handled = (tmp_path / "handled").read_text().split()
    assert sorted(handled) == sorted(str(i) for i in ids)

    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == cli.RET_OK, stderr
    logs = [json.loads(line) for line in stderr.splitlines()]  # every line is one JSON object
    messages = " | ".join(entry["message"] for entry in logs)
    assert "SIGTERM received: stopping gracefully" in messages
    assert f"message {dead} (cli.fail) is dead" in messages
    assert any(entry["logger"] == "outbox.relay" and "stopped" in entry["message"] for entry in logs)


@sqlite_only
def test_relay_process_freezes_its_heap(engine: sa.Engine, relay_process: Any, tmp_path: Path) -> None:
    """`outbox relay` runs with freeze_gc: the collector's full passes skip the start-up objects."""
    add(engine, "cli.gc")
    process = relay_process()
    wait_until(lambda: status_counts(engine) == {"delivered": 1}, timeout=30, what="delivery")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == cli.RET_OK, stderr
    (line,) = (tmp_path / "handled").read_text().splitlines()
    assert line.startswith("gc ") and int(line.split()[1]) > 10_000, line


@sqlite_only
def test_second_signal_exits_at_once(engine: sa.Engine, relay_process: Any) -> None:
    add(engine, "cli.slow", {"sleep": 60})
    process = relay_process("--stop-timeout", "60")
    wait_until(lambda: status_counts(engine) == {"inflight": 1}, timeout=30, what="the slow message to start")

    process.send_signal(signal.SIGINT)
    wait_until(
        lambda: "stopping gracefully" in _read_some(process), timeout=10, what="the graceful stop to begin"
    )
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=10)
    assert process.returncode == cli.RET_ERROR


@sqlite_only
def test_relay_process_fails_payloads_over_its_max_payload_bytes(
    engine: sa.Engine, relay_process: Any
) -> None:
    big = add(engine, payload=b"x" * 2_000)
    small = add(engine)
    process = relay_process("--max-payload-bytes", "1000")
    wait_until(lambda: status_counts(engine) == {"dead": 1, "delivered": 1}, timeout=30, what="the outcomes")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == cli.RET_OK, stderr
    with engine.connect() as conn:
        errors = dict(conn.execute(sa.select(T.c.id, T.c.last_error)).all())
    assert errors == {big: "payload of 2000 bytes exceeds max_payload_bytes 1000", small: None}
    settings = Settings.load({"database_url": "sqlite://"})
    assert settings.max_payload_bytes == outbox.writer.DEFAULT_MAX_PAYLOAD_BYTES == 4 * 1024 * 1024
    with pytest.raises(outbox.ConfigError, match=r"invalid max_payload_bytes 0: .*OUTBOX_MAX_PAYLOAD_BYTES"):
        Settings.load({"database_url": "sqlite://", "max_payload_bytes": 0})


def _read_some(process: subprocess.Popen[str]) -> str:
    assert process.stderr is not None
    return process.stderr.readline()
