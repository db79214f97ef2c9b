"""No password ever leaves a process: not in logs, CLI output, ``outbox doctor``, ``/metrics`` or ``/readyz``.

A password can be given in a database URL's userinfo (``user:SECRET@``), in its query string
(``?password=SECRET``, ``passwd``, ``sslpassword``), or as the Kafka SASL password; the URL and the SASL
password can also come from files (``--database-url-file``, ``--kafka-sasl-password-file``). The
acceptance tests run the real commands as subprocesses and grep everything they print.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

import outbox
from outbox._errors import ConfigError
from outbox.cli._config import Settings
from outbox.redaction import mask_url, scrub, url_secrets
from tests.apps import ROOT
from tests.apps.recording import RECORD_ENV, TOPIC
from tests.conftest import MARIADB_ADMIN, wait_until
from tests.kafka_broker import free_port
from tests.test_metrics import Scraper

USERINFO_SECRET = "Userinfo-Pw-4711"
QUERY_SECRET = "Query-Pw-0815"
SSL_SECRET = "Sslkey-Pw-1234"
SASL_SECRET = "Sasl-Pw-2718"
APP = "tests.apps.recording:registry"
ALL_SECRETS = (USERINFO_SECRET, QUERY_SECRET, SSL_SECRET, SASL_SECRET)


def with_password(url: str, form: str) -> str:
    """``url`` carrying a password in ``form``: ``userinfo`` (``user:PW@``) or ``query``
    (``?password=PW&sslpassword=PW2``, which libpq and PyMySQL take as connection parameters)."""
    parsed = sa.engine.make_url(url)
    if form == "userinfo":
        parsed = parsed.set(password=USERINFO_SECRET)
    else:
        parsed = parsed.update_query_dict({"password": QUERY_SECRET, "sslpassword": SSL_SECRET})
    return parsed.render_as_string(hide_password=False)


def run_outbox(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    child = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    child.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "outbox", *args],
        cwd=ROOT,
        env=child,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_no_secret(text: str, where: str) -> None:
    for secret in ALL_SECRETS:
        assert secret not in text, f"{secret!r} appears in {where}:\n{text[-3000:]}"


# --- the masking rules -------------------------------------------------------------------------------------


def test_every_form_of_database_password_is_masked_in_a_url() -> None:
    url = (
        f"postgresql://app:{USERINFO_SECRET}@db.example/shop?password={QUERY_SECRET}"
        f"&sslpassword={SSL_SECRET}&passfile=/etc/pgpass&application_name=relay"
    )
    masked = mask_url(url)
    assert_no_secret(masked, "the masked URL")
    assert "app:***@db.example" in masked and "password=***" in masked and "sslpassword=***" in masked
    assert "passfile=%2Fetc%2Fpgpass" in masked and "application_name=relay" in masked  # not secrets
    assert set(url_secrets(url)) == {USERINFO_SECRET, QUERY_SECRET, SSL_SECRET}


def test_secrets_a_driver_echoes_are_scrubbed_by_their_shape() -> None:
    """The second guard, for secrets it was never told about: URLs, conninfo strings, keyword arguments."""
    text = scrub(
        f"dsn 'host=db password={QUERY_SECRET} user=app' failed; connect(passwd='{SSL_SECRET}', port=1); "
        f"mysql://root:{USERINFO_SECRET}@h/d?ssl_key_password={SASL_SECRET}&charset=utf8mb4; "
        "at postgresql://h/db?password=***: refused; "
        "KafkaAdminClient configuration: {'sasl_plain_username': 'u', 'sasl_plain_password': 'pw'}"
    )
    assert_no_secret(text, "the scrubbed text")
    assert "host=db password=*** user=app" in text and "passwd='***'" in text
    assert "mysql://root:***@h/d?ssl_key_password=***&charset=utf8mb4" in text
    assert "?password=***: refused" in text  # the ":" after a URL is not taken for its password
    assert "'sasl_plain_password': '***'}" in text  # a password too short to remember, by its shape


def test_settings_know_every_password_they_hold() -> None:
    settings = Settings.load(
        {
            "database_url": with_password("postgresql://app@db/shop", "query"),
            "kafka_sasl_password": SASL_SECRET,
        }
    )
    assert set(settings.secrets) == {QUERY_SECRET, SSL_SECRET, SASL_SECRET}
    assert_no_secret(repr(settings), "repr(settings)")
    assert_no_secret(settings.masked_url, "settings.masked_url")


# --- secrets from files ------------------------------------------------------------------------------------


def test_database_url_and_sasl_password_can_come_from_files(tmp_path: Path) -> None:
    url_file, sasl_file = tmp_path / "url", tmp_path / "sasl"
    url_file.write_text(f"  postgresql://app:{USERINFO_SECRET}@db/shop\n")
    sasl_file.write_text(f"{SASL_SECRET}\n")
    settings = Settings.load({"database_url_file": str(url_file), "kafka_sasl_password_file": str(sasl_file)})
    assert settings.database_url == f"postgresql://app:{USERINFO_SECRET}@db/shop"
    assert settings.kafka_sasl_password == SASL_SECRET
    config = tmp_path / "outbox.toml"
    config.write_text(f'database_url_file = "{url_file}"\nkafka_sasl_password_file = "{sasl_file}"\n')
    from_config = Settings.load({}, config_file=config)
    assert from_config.database_url == settings.database_url
    assert from_config.kafka_sasl_password == SASL_SECRET


def test_a_secret_given_two_ways_at_once_is_a_configuration_error(tmp_path: Path) -> None:
    url_file = tmp_path / "url"
    url_file.write_text("sqlite:///x.db")
    with pytest.raises(ConfigError, match="give --database-url or --database-url-file, not both"):
        Settings.load({"database_url": "sqlite:///y.db", "database_url_file": str(url_file)})
    result = run_outbox("status", "--database-url", "sqlite:///y.db", "--database-url-file", str(url_file))
    assert result.returncode == 3
    assert result.stderr.strip() == "outbox: error: give --database-url or --database-url-file, not both"


def test_a_flag_beats_the_file_its_environment_twin_names(tmp_path: Path) -> None:
    """A setting and its ``*_FILE`` twin are one setting: a flag beats the environment, either way round."""
    good, bad = tmp_path / "good.db", tmp_path / "missing" / "bad.db"
    url_file = tmp_path / "url"
    url_file.write_text(f"sqlite:///{bad}")
    assert run_outbox("db", "upgrade", "--database-url", f"sqlite:///{good}").returncode == 0
    by_flag = run_outbox(
        "db",
        "version",
        "--database-url",
        f"sqlite:///{good}",
        env={"OUTBOX_DATABASE_URL_FILE": str(url_file)},
    )
    assert by_flag.returncode == 0, by_flag.stderr
    url_file.write_text(f"sqlite:///{good}")
    by_file_flag = run_outbox(
        "db", "version", "--database-url-file", str(url_file), env={"OUTBOX_DATABASE_URL": f"sqlite:///{bad}"}
    )
    assert by_file_flag.returncode == 0, by_file_flag.stderr


@pytest.mark.parametrize(
    ("content", "fragment"), [(None, "no such file"), ("  \n", "is empty"), (b"\xff\xfe", "not UTF-8")]
)
def test_an_unusable_secret_file_is_a_one_line_error(
    tmp_path: Path, content: str | bytes | None, fragment: str
) -> None:
    path = tmp_path / "url"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = run_outbox("status", env={"OUTBOX_DATABASE_URL_FILE": str(path)})
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("outbox: error: --database-url-file "), result.stderr
    assert fragment in lines[0], result.stderr


def test_help_steers_passwords_away_from_flags() -> None:
    text = " ".join(run_outbox("relay", "--help").stdout.split())
    assert "--database-url-file" in text and "OUTBOX_DATABASE_URL_FILE" in text
    assert "--kafka-sasl-password-file" in text and "OUTBOX_KAFKA_SASL_PASSWORD_FILE" in text
    assert text.count("visible to every user in ps") >= 2


# --- acceptance: every output of the real commands ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_no_password_appears_in_any_output(
    engine: sa.Engine, db_url: str, kafka_bootstrap: str, tmp_path: Path, form: str
) -> None:
    """A relay (DEBUG logs, its ops server, SASL against a broker that refuses it), ``outbox status``,
    ``list --json``, ``show``, ``doctor`` (text and JSON), ``db version`` and the connection errors of an
    unreachable port, with the database password in ``form`` and a SASL password: no password appears.
    PostgreSQL's trust authentication accepts and ignores the password, so everything really runs."""
    url = with_password(db_url, form)
    outputs: dict[str, str] = {}
    url_file, sasl_file, record = tmp_path / "database-url", tmp_path / "sasl-password", tmp_path / "handled"
    url_file.write_text(url + "\n")
    sasl_file.write_text(SASL_SECRET + "\n")
    with engine.begin() as conn:
        ids = [outbox.add(conn, TOPIC, {"i": i}) for i in range(5)]
        outbox.add(conn, "to.kafka", {"n": 1})  # no handler: to the broker, whose SASL handshake fails

    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        OUTBOX_DATABASE_URL_FILE=str(url_file),
        OUTBOX_KAFKA_SASL_PASSWORD_FILE=str(sasl_file),
        **{RECORD_ENV: str(record)},
    )
    log_path = tmp_path / "relay.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "outbox", "relay", "--app", APP),
                *("--log-level", "DEBUG", "--stop-timeout", "1", "--poll-interval", "0.2"),
                *(
                    "--kafka-bootstrap-servers",
                    kafka_bootstrap,
                    "--kafka-security-protocol",
                    "SASL_PLAINTEXT",
                ),
                *("--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username", "relay"),
                *("--kafka-request-timeout-ms", "3000", "--metrics-port", "0", "--metrics-host", "127.0.0.1"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: "serving /metrics" in log_path.read_text(errors="replace"),
            timeout=30,
            what="the relay's ops server",
            explain=lambda: log_path.read_text(errors="replace")[-3000:],
        )
        port = int(re.search(r"on http://127\.0\.0\.1:(\d+)", log_path.read_text())[1])  # type: ignore[index]
        scrape = Scraper(port)
        wait_until(
            lambda: record.exists() and record.read_text().count("done ") == len(ids),
            timeout=30,
            what="the relay to deliver with the password-bearing URL",
            explain=lambda: log_path.read_text(errors="replace")[-3000:],
        )
        outputs["/healthz"] = scrape.get("/healthz")[1].decode()
        outputs["/metrics"] = scrape.get("/metrics")[1].decode()
        outputs["/readyz"] = scrape.get("/readyz")[1].decode()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    outputs["relay log"] = log_path.read_text(errors="replace")
    started = next(line for line in outputs["relay log"].splitlines() if "started on" in line)
    assert ("postgres:***@" if form == "userinfo" else "password=***") in started, started
    assert "outbox_relay_in_flight" in outputs["/metrics"] and '"checks"' in outputs["/readyz"]

    # every inspection command, with the URL in the environment and, worst case, as a flag
    by_env = {"OUTBOX_DATABASE_URL": url}
    commands: list[tuple[tuple[str, ...], dict[str, str] | None, int]] = [
        (("status",), by_env, 0),
        (("status", "--json", "--database-url", url), None, 0),
        (("list", "--json"), by_env, 0),
        (("list", "--database-url-file", str(url_file)), None, 0),
        (("show", str(ids[0]), "--json"), by_env, 0),
        (("doctor",), by_env, 0),
        (("doctor", "--json", "--database-url", url), None, 0),
        (("db", "version", "--json"), by_env, 0),
    ]
    unreachable = str(sa.engine.make_url(url).set(port=free_port()).render_as_string(hide_password=False))
    for args in (("status",), ("list", "--json"), ("doctor",), ("doctor", "--json"), ("relay", "--app", APP)):
        commands.append((args, {"OUTBOX_DATABASE_URL": unreachable}, -1))
    for args, extra, expected in commands:
        result = run_outbox(*args, env=extra)
        where = f"`outbox {' '.join(args)}`" + (" (unreachable)" if expected < 0 else "")
        if expected >= 0:
            assert result.returncode == expected, f"{where}: {result.stderr}"
        else:
            assert result.returncode != 0 and ("refused" in result.stdout + result.stderr), result
        outputs[where] = result.stdout + result.stderr
    assert json.loads(outputs["`outbox list --json`"].strip())  # the output is the command's real output
    for where, text in outputs.items():
        assert_no_secret(text, where)


@pytest.mark.parametrize("parameter", ["userinfo", "password", "passwd"])
def test_a_refused_password_is_masked_in_the_connection_error(parameter: str) -> None:
    """MariaDB's root has no password here, so any password is refused: the error each command prints
    (the driver's "Access denied" included) names the URL, never the password."""
    parsed = sa.engine.make_url(MARIADB_ADMIN)
    if parameter == "userinfo":
        parsed = parsed.set(password=USERINFO_SECRET)
    else:
        parsed = parsed.update_query_dict({parameter: QUERY_SECRET})
    url = parsed.render_as_string(hide_password=False)
    for args in (("status",), ("list", "--json"), ("doctor", "--json"), ("relay", "--app", APP)):
        result = run_outbox(*args, "--database-url", url)
        text = result.stdout + result.stderr
        assert result.returncode != 0, text
        assert "Access denied" in text, text
        assert_no_secret(text, f"`outbox {' '.join(args)}`")
        assert "root:***@" in text or f"{parameter}=***" in text, text


def test_consume_never_prints_the_sasl_password(kafka_bootstrap: str, tmp_path: Path) -> None:
    """``outbox consume`` refused by the broker's SASL (kafka-python's handshake errors at DEBUG, then
    its one-line error): no password in any line."""
    url = f"sqlite:///{tmp_path / 'consumer.db'}"
    sasl_file = tmp_path / "sasl"
    sasl_file.write_text(SASL_SECRET)
    assert run_outbox("db", "upgrade", "--database-url", url).returncode == 0
    result = run_outbox(
        *("consume", "--app", "tests.apps.consumer_app:registry", "--group", f"g{uuid.uuid4().hex[:6]}"),
        *("--database-url", url, "--log-level", "DEBUG", "--kafka-bootstrap-servers", kafka_bootstrap),
        *("--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-mechanism", "PLAIN"),
        *("--kafka-sasl-username", "c", "--kafka-sasl-password-file", str(sasl_file)),
    )
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "SaslHandshake" in text, text[-3000:]
    assert_no_secret(text, "outbox consume")
