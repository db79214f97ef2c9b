"""The web dashboard (outbox.web) on each database: its pages show what the operator layer reports, and
it is read-only, escaped, bounded, mountable and, standalone (``outbox web``), never open by accident."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import outbox
from consumers import Registry
from outbox._message import Message
from outbox._schema import Status, tables_for
from outbox.admin import Operations
from outbox.cli import RET_CONFIG, RET_OK
from outbox.cli import outbox as outbox_cli
from outbox.cli._config import Settings
from outbox.web import create_app
from outbox.web._auth import BasicAuth, parse_credentials
from tests.conftest import ROOT, status_counts, wait_until

T = tables_for().messages
PYTHON = sys.executable


def add(engine: sa.Engine, topic: str = "orders.created", payload: Any = None, **kwargs: Any) -> uuid.UUID:
    with engine.begin() as conn:
        return outbox.add(conn, topic, {"n": 1} if payload is None else payload, **kwargs)


def seq_of(engine: sa.Engine, message_id: uuid.UUID) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(T.c.seq).where(T.c.id == message_id)).scalar_one())


def seqs_on(html: str) -> list[int]:
    return [int(s) for s in re.findall(r'<tr data-seq="(\d+)">', html)]


def count_of(html: str, status: str) -> int:
    match = re.search(rf'data-status="{status}">(\d+)<', html)
    assert match, f"no count for {status}"
    return int(match.group(1))


def next_link(html: str) -> str | None:
    match = re.search(r'<a href="([^"]+)" rel="next">', html)
    return match.group(1).replace("&amp;", "&") if match else None


def run_relay_until_settled(engine: sa.Engine) -> None:
    """A real relay delivers ``orders.*`` and kills ``orders.poison`` (one attempt) until nothing is due."""
    from relay import Relay

    registry = Registry()

    @registry.handler("orders.created")
    def deliver(message: Message) -> None:
        pass

    @registry.handler("orders.poison", max_attempts=1)
    def fail(message: Message) -> None:
        raise RuntimeError("poison: cannot handle <this>")

    with Relay(engine, registry, poll_interval=0.05):
        wait_until(
            lambda: status_counts(engine).get("delivered") == 2 and status_counts(engine).get("dead") == 1,
            timeout=30,
            what="2 delivered and 1 dead",
            explain=lambda: str(status_counts(engine)),
        )


# --- pages --------------------------------------------------------------------------------------------------


def test_overview_shows_what_the_relay_did(engine: sa.Engine) -> None:
    add(engine, "orders.created")
    add(engine, "orders.created")
    dead = add(engine, "orders.poison")
    waiting = add(engine, "orders.created", delay=dt.timedelta(hours=1))
    run_relay_until_settled(engine)

    client = TestClient(create_app(engine))
    page = client.get("/")
    assert page.status_code == 200
    html = page.text
    report = Operations(engine).status()
    for status in Status:
        assert count_of(html, status.value) == report.counts[status.value]
    assert (count_of(html, "delivered"), count_of(html, "dead"), count_of(html, "pending")) == (2, 1, 1)
    assert '<a href="/messages?topic=orders.poison">orders.poison</a>' in html
    # times: UTC, ISO 8601 with the offset, in <time datetime>
    created = report.oldest_waiting_at
    assert created is not None
    assert f'<time datetime="{created.isoformat()}+00:00">' in html
    assert re.search(r'<dd id="due-now">0</dd>', html)
    assert re.search(r'<dd id="expired-leases">0</dd>', html)
    assert re.search(r'<dd id="parked-keys">0</dd>', html)

    # the dead message, by its status filter, and its page with the relay's error
    listed = client.get("/messages", params={"status": "dead"}).text
    assert seqs_on(listed) == [seq_of(engine, dead)]
    shown = client.get(f"/messages/{dead}").text
    assert '<dd class="status-dead" id="status">dead</dd>' in shown
    assert "RuntimeError: poison: cannot handle &lt;this&gt;" in shown
    assert '<dd id="attempts">1</dd>' in shown
    assert seqs_on(client.get("/messages", params={"status": "pending"}).text) == [seq_of(engine, waiting)]


def test_filters_and_keyset_paging(engine: sa.Engine) -> None:
    orders = [add(engine, "orders.created", key="a" if i % 2 else "b") for i in range(7)]
    add(engine, "users.signed_up")
    add(engine, "orders_created")  # "_" is no wildcard: orders.* does not match it
    client = TestClient(create_app(engine))

    pages: list[list[int]] = []
    url: str | None = "/messages?topic=orders.*&limit=3"
    while url is not None:
        html = client.get(url).text
        pages.append(seqs_on(html))
        url = next_link(html)
        if url is not None:
            assert f"after={pages[-1][-1]}" in url  # the next page starts after the last seq shown
    expected = sorted((seq_of(engine, m) for m in orders), reverse=True)
    assert pages == [expected[:3], expected[3:6], expected[6:]]

    keyed = seqs_on(client.get("/messages", params={"key": "a", "topic": "orders.created"}).text)
    assert keyed == sorted((seq_of(engine, m) for i, m in enumerate(orders) if i % 2), reverse=True)
    assert seqs_on(client.get("/messages", params={"topic": "users.*"}).text) != []
    assert seqs_on(client.get("/messages", params={"status": "dead"}).text) == []

    # each row links to its message
    html = client.get("/messages").text
    assert f'<a href="/messages/{expected[0]}">{expected[0]}</a>' in html
    # the page size is capped, and a bad query is a 400 page, not an error
    assert (
        'name="limit" type="number" min="1" max="200" value="200"' in client.get("/messages?limit=99999").text
    )
    for bad in ("status=bogus", "limit=0", "after=-1", "limit=x"):
        assert client.get(f"/messages?{bad}").status_code == 400


def test_message_page_by_seq_and_by_id(engine: sa.Engine) -> None:
    message_id = add(
        engine, "orders.created", {"order": 42, "items": ["a", "b"]}, key="k1", headers={"tenant": "acme"}
    )
    binary = add(engine, "blobs.raw", bytes(range(100)))
    client = TestClient(create_app(engine))
    seq = seq_of(engine, message_id)

    by_seq, by_id = client.get(f"/messages/{seq}"), client.get(f"/messages/{message_id}")
    assert by_seq.status_code == by_id.status_code == 200
    assert by_seq.text == by_id.text
    html = by_seq.text
    assert f"<code>{message_id}</code>" in html
    assert '<pre id="payload">{\n  &#34;order&#34;: 42,' in html  # pretty JSON, escaped
    assert "<th>tenant</th><td>acme</td>" in html
    assert "<dd>k1</dd>" in html
    assert '<dt>due at</dt><dd><time datetime="' in html

    raw = client.get(f"/messages/{binary}").text
    assert "&lt;100 bytes&gt; 00 01 02 03" in raw
    assert " ..." in raw  # more than the 64 bytes previewed

    for unknown in ("999999", str(uuid.uuid4()), "not-a-message", "9" * 40):
        answer = client.get(f"/messages/{unknown}")
        assert answer.status_code == 404, unknown
        assert "No such message" in answer.text


def test_an_inflight_message_shows_its_lease(engine: sa.Engine) -> None:
    message_id = add(engine)
    expires = dt.datetime(2030, 1, 2, 3, 4, 5)
    with engine.begin() as conn:
        conn.execute(
            sa.update(T)
            .where(T.c.id == message_id)
            .values(status=Status.INFLIGHT.value, lease_token="tok123", due_at=expires)
        )
    html = TestClient(create_app(engine)).get(f"/messages/{message_id}").text
    assert "<dt>lease expires at</dt>" in html
    assert 'lease <code>tok123</code>, expires <time datetime="2030-01-02T03:04:05+00:00">' in html


def test_hide_payloads_hides_them(engine: sa.Engine) -> None:
    message_id = add(engine, "users.signed_up", {"email": "ann@example.com"}, headers={"ip": "10.1.2.3"})
    client = TestClient(create_app(engine, hide_payloads=True))
    for path in ("/", "/messages", f"/messages/{message_id}"):
        html = client.get(path).text
        assert "ann@example.com" not in html and "10.1.2.3" not in html, path
    assert 'id="hidden"' in client.get(f"/messages/{message_id}").text
    shown = TestClient(create_app(engine)).get(f"/messages/{message_id}").text
    assert "ann@example.com" in shown and "10.1.2.3" in shown


def test_a_script_in_a_payload_is_shown_not_run(engine: sa.Engine) -> None:
    evil = "<script>alert('x')</script>"
    message_id = add(engine, "orders.created", {"note": evil}, key=evil, headers={"h": evil})
    with engine.begin() as conn:
        conn.execute(sa.update(T).where(T.c.id == message_id).values(last_error=evil))
    client = TestClient(create_app(engine, title=evil))
    for path in ("/", "/messages", f"/messages/{message_id}", f"/messages?key={evil}"):
        html = client.get(path).text
        scripts = re.findall(r"<script[^>]*>", html)
        assert scripts == ['<script src="/static/dashboard.js" defer>'], (path, scripts)  # only ours
        assert "&lt;script&gt;" in html, path


# --- the app's promises ------------------------------------------------------------------------------------


def test_security_headers_on_every_answer(engine: sa.Engine) -> None:
    message_id = add(engine)
    client = TestClient(create_app(engine))
    answers = [
        client.get("/"),
        client.get("/messages"),
        client.get(f"/messages/{message_id}"),
        client.get("/messages/404"),
        client.get("/no/such/page"),
        client.get("/static/dashboard.css"),
        client.post("/"),
        client.get("/messages?status=bogus"),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 404, 404, 200, 405, 400]
    for answer in answers:
        csp = answer.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "unsafe-inline" not in csp
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "same-origin"
    # no inline script or style on any page: the CSP would block them
    for answer in answers[:3]:
        assert re.findall(r"<script[^>]*>", answer.text) == ['<script src="/static/dashboard.js" defer>']
        assert "<style" not in answer.text and " style=" not in answer.text
        assert not re.search(r"<[^>]*\son[a-z]+=", answer.text)  # no inline event handler


def test_every_route_refuses_state_changing_methods(engine: sa.Engine) -> None:
    """Read-only (the default): pages answer GET and HEAD only; the action routes refuse even to show a
    dry run (403), and a forged POST to them changes nothing."""
    message_id = add(engine)
    app = create_app(engine)
    client = TestClient(app)
    paths = []
    for route in app.routes:
        if isinstance(route, Route):
            if route.path.startswith("/actions/") or route.path == "/dead-letters/replay":
                continue
            assert route.methods == {"GET", "HEAD"}, route.path
            if route.path == "/dead-letters/{seq:int}":
                continue  # none here: its GET is a 404, tested with the dead letters
            paths.append(route.path.replace("{ref}", str(message_id)))
        else:
            paths.append(route.path + "/dashboard.css")
    assert len(paths) == 6
    for path in paths:
        assert client.get(path).status_code == 200, path
        assert client.head(path).status_code == 200, path
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            assert client.request(method, path).status_code == 405, (method, path)
    for action in ("replay", "purge"):
        assert client.get(f"/actions/{action}", params={"ref": str(message_id)}).status_code == 403
        forged = client.post(f"/actions/{action}", data={"ref": str(message_id), "csrf": "1.x"})
        assert forged.status_code == 403, action
        for method in ("PUT", "PATCH", "DELETE"):
            assert client.request(method, f"/actions/{action}").status_code == 405
    assert client.get("/dead-letters/replay", params={"all": "1"}).status_code == 403
    assert client.post("/dead-letters/replay", data={"all": "1", "csrf": "1.x"}).status_code == 403
    page = client.get(f"/messages/{message_id}").text
    assert 'id="read-only"' in page and "/actions/" not in page
    assert status_counts(engine) == {"pending": 1}


def test_mounted_under_a_prefix(engine: sa.Engine) -> None:
    message_id = add(engine)
    host = Starlette(routes=[Mount("/outbox", app=create_app(engine))])
    client = TestClient(host)
    html = client.get("/outbox/").text
    links = re.findall(r'(?:href|action)="([^"]+)"', html)
    assert links and all(link.startswith("/outbox/") for link in links), links
    for link in links:
        assert client.get(link.replace("&amp;", "&")).status_code == 200, link
    listing = client.get("/outbox/messages").text
    message_link = re.search(r'<a href="(/outbox/messages/\d+)">', listing)
    assert message_link
    assert str(message_id) in client.get(message_link.group(1)).text
    assert client.get("/messages").status_code == 404  # nothing outside its prefix


def test_an_app_from_a_url_disposes_its_engine_at_shutdown(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'web.db'}"
    engine = outbox.create_engine(url)
    with engine.begin() as conn:
        outbox.upgrade(conn)
    engine.dispose()
    with TestClient(create_app(url, title="shop")) as client:
        page = client.get("/")
        assert page.status_code == 200 and "<title>Overview · shop</title>" in page.text


# --- standalone: outbox web -------------------------------------------------------------------------------


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth(engine: sa.Engine) -> None:
    client = TestClient(
        BasicAuth(create_app(engine), parse_credentials("alice:s3cret\nbob:pw:with:colons\n", "x"))
    )
    refused = client.get("/")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith('Basic realm="outbox"')
    assert client.get("/", headers=basic("alice", "s3cret")).status_code == 200
    assert client.get("/messages", headers=basic("bob", "pw:with:colons")).status_code == 200
    for user, password in (("alice", "wrong"), ("alice", ""), ("mallory", "s3cret"), ("bob", "s3cret")):
        assert client.get("/", headers=basic(user, password)).status_code == 401, user
    assert client.get("/", headers={"Authorization": "Basic !!!"}).status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer abc"}).status_code == 401

    with pytest.raises(outbox.ConfigError, match="line 2: expected user:password"):
        parse_credentials("alice:s3cret\nnopassword\n", "the file")
    with pytest.raises(outbox.ConfigError, match="no user:password"):
        parse_credentials("# only a comment\n", "the file")


def sqlite_outbox(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    engine = outbox.create_engine(url)
    with engine.begin() as conn:
        outbox.upgrade(conn)
        outbox.add(conn, "orders.created", {"n": 1})
    engine.dispose()
    return url


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_outbox_web_refuses_a_public_host_without_auth(tmp_path: Path, host: str) -> None:
    url = sqlite_outbox(tmp_path)
    result = CliRunner().invoke(outbox_cli, ["web", "--database-url", url, "--host", host])
    assert result.exit_code == RET_CONFIG == 3
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"outbox: error: refusing to serve the dashboard on {host} without auth")
    by_env = CliRunner().invoke(
        outbox_cli, ["web"], env={"OUTBOX_DATABASE_URL": url, "OUTBOX_WEB_HOST": host}
    )
    assert by_env.exit_code == RET_CONFIG


def test_web_settings_come_from_flags_environment_and_config_file(tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    auth.write_text("alice:s3cret\n")
    config = tmp_path / "outbox.toml"
    config.write_text(
        f'database_url = "sqlite://"\nweb_host = "0.0.0.0"\nweb_port = 9000\nhide_payloads = true\n'
        f'web_auth_file = "{auth}"\n'
    )
    settings = Settings.load({}, config_file=config)
    assert (settings.web_host, settings.web_port, settings.hide_payloads) == ("0.0.0.0", 9000, True)
    assert settings.web_auth == "alice:s3cret"
    assert "s3cret" in settings.secrets and "s3cret" not in repr(settings)
    assert Settings.load({"database_url": "sqlite://", "web_port": 8081}, config_file=config).web_port == 8081
    assert Settings.load({"database_url": "sqlite://"}).web_host == "127.0.0.1"
    with pytest.raises(outbox.ConfigError, match="--port, OUTBOX_WEB_PORT or web_port"):
        Settings.load({"database_url": "sqlite://", "web_port": 70000})
    with pytest.raises(outbox.ConfigError, match="give --auth or --auth-file"):
        Settings.load({"database_url": "sqlite://", "web_auth": "a:b", "web_auth_file": str(auth)})


def test_outbox_needs_no_web_extra(tmp_path: Path) -> None:
    """starlette, jinja2 and uvicorn are the web extra: everything else imports without them, and
    ``outbox web`` says in one line what to install."""
    blocked = "import sys\nfor m in ('starlette', 'jinja2', 'uvicorn'): sys.modules[m] = None\n"
    code = blocked + "import outbox, outbox.admin, outbox.cli, relay, consumers\nprint('ok')"
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.stdout.strip() == "ok", result.stderr
    url = sqlite_outbox(tmp_path)
    code = blocked + f"from outbox.cli import main\nmain(['web', '--database-url', {url!r}])"
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == RET_CONFIG
    assert result.stderr == "outbox: error: outbox web needs the web extra: pip install 'sqla-outbox[web]'\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_outbox_web_serves_over_http_until_sigterm(tmp_path: Path) -> None:
    url, port = sqlite_outbox(tmp_path), free_port()
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": url,
        "OUTBOX_WEB_PORT": str(port),
        "OUTBOX_HIDE_PAYLOADS": "1",
    }
    process = subprocess.Popen(
        [PYTHON, "-m", "outbox", "web"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:

        def fetch() -> tuple[int, str] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/messages/1", timeout=2) as answer:
                    return answer.status, answer.read().decode()
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, process.communicate()
                return None

        status, html = wait_until(fetch, timeout=30, what="outbox web to answer")  # type: ignore[misc]
        assert status == 200
        assert 'id="hidden"' in html and "&#34;n&#34;" not in html  # OUTBOX_HIDE_PAYLOADS
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == RET_OK, stderr
        assert b"dashboard of outbox table 'outbox' on http://127.0.0.1:" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


# --- keys and actions -------------------------------------------------------------------------------------


def park_key(engine: sa.Engine, key: str, behind: int) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A real relay parks ``key``'s first message (strict order, one attempt); ``behind`` more wait."""
    from relay import Relay

    head = add(engine, "payments.poison", key=key)
    rest = [add(engine, "payments.poison", {"n": i}, key=key) for i in range(behind)]
    registry = Registry()

    @registry.handler("payments.poison", max_attempts=1, strict_order=True)
    def fail(message: Message) -> None:
        raise RuntimeError("cannot pay")

    with Relay(engine, registry, poll_interval=0.05):
        wait_until(lambda: status_counts(engine).get("parked") == 1, timeout=30, what="the key's head parked")
    return head, rest


def deliver_all(engine: sa.Engine, until: Any) -> None:
    """A real relay that delivers every topic until ``until()``."""
    from relay import Relay

    registry = Registry()

    @registry.handler("*")
    def deliver(message: Message) -> None:
        pass

    with Relay(engine, registry, poll_interval=0.05):
        wait_until(until, timeout=30, what="delivery", explain=lambda: str(status_counts(engine)))


def form_of(html: str) -> tuple[str, list[tuple[str, str]]]:
    """The confirmation form of a dry-run page: its action and its fields."""
    match = re.search(r'<form method="post" action="([^"]+)"', html)
    assert match, html
    fields = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', html)
    return match.group(1), [(k, v.replace("&amp;", "&")) for k, v in fields]


def submit(client: TestClient, action: str, fields: list[tuple[str, str]], headers: Any = None) -> Any:
    """POST ``fields`` as a browser posts a form (repeated names kept)."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    return client.post(action, content=urlencode(fields), headers={**form, **(headers or {})})


def dry_count(html: str) -> int:
    match = re.search(r'<strong id="dry-count">(\d+)</strong>', html)
    assert match, html
    return int(match.group(1))


def test_keys_page_shows_a_parked_key_and_replaying_its_head_drains_it(engine: sa.Engine) -> None:
    head, _ = park_key(engine, "acct-7", behind=4)
    add(engine, "orders.created", key="other")  # a key nobody holds: not on the page
    client = TestClient(create_app(engine, allow_actions=True))
    page = client.get("/keys").text
    row = re.search(r'<tr data-key="acct-7">(.*?)</tr>', page, re.S)
    assert row, page
    assert 'class="status-parked">parked<' in row.group(1)
    assert '<td class="waiting">4</td>' in row.group(1)
    assert "RuntimeError: cannot pay" in row.group(1)
    assert 'data-key="other"' not in page
    head_seq = seq_of(engine, head)
    assert f'href="/messages/{head_seq}">{head_seq}<' in row.group(1)

    # the head's replay: dry run (1), confirmation, then a relay drains the whole key in order
    replay = re.search(r'<a class="action" href="([^"]+)">Replay head</a>', row.group(1))
    assert replay
    preview = client.get(replay.group(1).replace("&amp;", "&")).text
    assert dry_count(preview) == 1 and ">Replay 1 message</button>" in preview
    action, fields = form_of(preview)
    done = submit(client, action, fields)
    assert done.status_code == 200 and '<h1 id="done">Replayed 1 message</h1>' in done.text
    deliver_all(engine, lambda: status_counts(engine) == {"delivered": 6})
    assert "No key is held." in client.get("/keys").text


def test_replay_everything_a_filter_matches_stops_at_what_the_dry_run_counted(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    dead = [add(engine, "orders.poison", {"n": i}) for i in range(5)]
    other = add(engine, "mail.poison")
    with engine.begin() as conn:
        conn.execute(sa.update(T).values(status=Status.DEAD.value, attempts=3, due_at=None))
    client = TestClient(create_app(engine, allow_actions=True))
    listing = client.get("/messages", params={"status": "dead", "topic": "orders.*"}).text
    link = re.search(r'id="replay-matching" href="([^"]+)"', listing)
    assert link
    preview = client.get(link.group(1).replace("&amp;", "&")).text
    assert dry_count(preview) == 5 and ">Replay 5 messages</button>" in preview
    action, fields = form_of(preview)
    assert ("up_to", str(seq_of(engine, other))) in fields  # the newest message when the dry run ran

    late = add(engine, "orders.poison")  # written after the dry run: left alone by its confirmation
    with engine.begin() as conn:
        conn.execute(sa.update(T).where(T.c.id == late).values(status=Status.DEAD.value, due_at=None))
    with caplog.at_level("INFO", logger="outbox.web.audit"):
        done = submit(client, action, fields)
    assert '<h1 id="done">Replayed 5 messages</h1>' in done.text
    with engine.connect() as conn:
        statuses = dict(conn.execute(sa.select(T.c.id, T.c.status)).all())
    assert [statuses[d] for d in dead] == ["pending"] * 5
    assert (statuses[other], statuses[late]) == ("dead", "dead")
    lines = [r.getMessage() for r in caplog.records if r.name == "outbox.web.audit"]
    assert lines == [
        "dashboard replay by anonymous from testclient: status=dead topic=orders.* "
        f"up to seq {seq_of(engine, other)} -> 5 message(s)"
    ]


def test_replay_and_purge_a_selection(engine: sa.Engine) -> None:
    ids = [add(engine, "orders.poison", {"n": i}) for i in range(4)]
    pending = add(engine)
    with engine.begin() as conn:
        conn.execute(sa.update(T).where(T.c.id.in_(ids)).values(status=Status.DEAD.value, due_at=None))
    seqs = [seq_of(engine, i) for i in ids]
    client = TestClient(create_app(engine, allow_actions=True))
    listing = client.get("/messages").text
    assert f'<input type="checkbox" name="ref" value="{seqs[0]}" form="selection"' in listing

    # replay two of them and the pending one: the pending one is left alone, and said so
    preview = client.get(
        "/actions/replay", params=[("ref", str(s)) for s in seqs[:2]] + [("ref", str(pending))]
    )
    assert dry_count(preview.text) == 2 and f"<code>{pending}</code>: pending" in preview.text
    action, fields = form_of(preview.text)
    assert submit(client, action, fields).status_code == 200

    # purge the other two, and try the pending one: it is never deleted
    preview = client.get(
        "/actions/purge", params=[("ref", str(s)) for s in seqs[2:]] + [("ref", str(pending))]
    )
    assert dry_count(preview.text) == 2 and ">Purge 2 messages</button>" in preview.text
    action, fields = form_of(preview.text)
    assert '<h1 id="done">Purged 2 messages</h1>' in submit(client, action, fields).text
    with engine.connect() as conn:
        left = dict(conn.execute(sa.select(T.c.id, T.c.status)).all())
    assert left == {ids[0]: "pending", ids[1]: "pending", pending: "pending"}

    assert client.get("/actions/replay", params={"ref": "nope"}).status_code == 400
    assert client.get("/actions/replay", params={"ref": "999999"}).status_code == 404
    assert client.get("/actions/replay", params={"status": "pending"}).status_code == 400
    assert client.get("/actions/explode", params={"ref": "1"}).status_code == 403


def test_an_action_needs_a_fresh_token_of_its_user_from_this_site(engine: sa.Engine) -> None:
    message_id = add(engine)
    with engine.begin() as conn:
        conn.execute(sa.update(T).values(status=Status.DEAD.value, due_at=None))
    app = create_app(engine, allow_actions=True, secret=b"k" * 32)
    client = TestClient(BasicAuth(app, {"alice": "a", "bob": "b"}))
    preview = client.get("/actions/replay", params={"ref": str(message_id)}, headers=basic("alice", "a"))
    action, fields = form_of(preview.text)
    without = [(k, v) for k, v in fields if k != "csrf"]
    assert submit(client, action, without, basic("alice", "a")).status_code == 403
    forged = [*without, ("csrf", "1700000000.00")]
    assert submit(client, action, forged, basic("alice", "a")).status_code == 403
    assert submit(client, action, fields, basic("bob", "b")).status_code == 403  # alice's token
    elsewhere = {**basic("alice", "a"), "Origin": "https://evil.example"}
    assert submit(client, action, fields, elsewhere).status_code == 403
    cross = {**basic("alice", "a"), "Sec-Fetch-Site": "cross-site"}
    assert submit(client, action, fields, cross).status_code == 403
    assert client.post(action, content=b"not a form", headers=basic("alice", "a")).status_code == 400
    assert status_counts(engine) == {"dead": 1}
    ok = submit(client, action, fields, {**basic("alice", "a"), "Origin": "http://testserver"})
    assert ok.status_code == 200 and status_counts(engine) == {"pending": 1}

    from outbox.web._actions import TOKEN_LIFETIME, Csrf

    csrf = Csrf(b"k" * 32)
    token = csrf.token("alice", now=1_000_000)
    assert csrf.valid(token, "alice", now=1_000_000 + TOKEN_LIFETIME)
    assert not csrf.valid(token, "alice", now=1_000_001 + TOKEN_LIFETIME)
    assert not csrf.valid(token, "bob", now=1_000_000)
    assert not Csrf(b"j" * 32).valid(token, "alice", now=1_000_000)


def test_a_resolver_grants_rights_per_request(engine: sa.Engine, caplog: pytest.LogCaptureFixture) -> None:
    message_id = add(engine)
    with engine.begin() as conn:
        conn.execute(sa.update(T).values(status=Status.DEAD.value, due_at=None))

    def rights(request: Any) -> Any:
        return {"alice": {"replay"}, "root": True}.get(request.user.display_name, False)

    client = TestClient(
        BasicAuth(create_app(engine, allow_actions=rights), {"alice": "a", "bob": "b", "root": "r"})
    )
    page = client.get(f"/messages/{message_id}", headers=basic("alice", "a")).text
    assert 'id="replay"' in page and 'id="purge"' not in page
    page = client.get(f"/messages/{message_id}", headers=basic("bob", "b")).text
    assert 'id="read-only"' in page and "/actions/" not in page
    assert (
        client.get("/actions/purge", params={"ref": str(message_id)}, headers=basic("alice", "a")).status_code
        == 403
    )
    assert (
        client.get("/actions/replay", params={"ref": str(message_id)}, headers=basic("bob", "b")).status_code
        == 403
    )
    preview = client.get("/actions/purge", params={"ref": str(message_id)}, headers=basic("root", "r"))
    action, fields = form_of(preview.text)
    with caplog.at_level("INFO", logger="outbox.web.audit"):
        assert submit(client, action, fields, basic("root", "r")).status_code == 200
    assert status_counts(engine) == {}
    assert fields[0] == ("ref", str(message_id))
    assert [r.getMessage() for r in caplog.records if r.name == "outbox.web.audit"] == [
        f"dashboard purge by root from testclient: messages {message_id} -> 1 message(s)"
    ]

    with pytest.raises(ValueError, match="unknown dashboard action 'replya'"):
        TestClient(create_app(engine, allow_actions=lambda request: {"replya"})).get("/")


def test_a_message_page_shows_its_key_around_it(engine: sa.Engine) -> None:
    ids = [add(engine, "orders.created", {"n": i}, key="k") for i in range(9)]
    add(engine, "orders.created", key="other")
    client = TestClient(create_app(engine))
    page = client.get(f"/messages/{ids[4]}").text
    around = re.search(r'<table class="messages" id="around">(.*?)</table>', page, re.S)
    assert around
    shown = [int(n) for n in re.findall(r'<tr data-seq="(\d+)"', around.group(1))]
    assert shown == [seq_of(engine, i) for i in ids[1:8]]
    assert f'<tr data-seq="{seq_of(engine, ids[4])}" class="this">' in around.group(1)


def test_overview_shows_the_relays_their_activity_and_the_actions(engine: sa.Engine) -> None:
    add(engine, "orders.created")
    add(engine, "orders.created")
    dead = add(engine, "orders.poison")
    client = TestClient(create_app(engine, allow_actions=True))
    html = client.get("/").text
    assert '<p id="relays-alive">0 alive.</p>' in html and 'id="no-actions"' in html
    assert "Last hour, per minute: 0 delivered, 0 failed, 0 dead" in html

    run_relay_until_settled(engine)  # a real relay: its heartbeat rows, then its stop
    html = client.get("/").text
    row = re.search(r'<tr data-relay="([^"]+)">(.*?)</tr>', html, re.S)
    assert row, html
    assert '<td class="gone">stopped</td>' in row.group(2)
    assert "<td>2</td><td>0</td><td>1</td>" in row.group(2)  # delivered, failed, dead
    assert "Last hour, per minute: 2 delivered, 0 failed, 1 dead" in html
    assert "Last day, per 15 minutes: 2 delivered, 0 failed, 1 dead" in html
    assert html.count("<title>") >= 60 + 96  # one tooltip a step
    latency = re.search(r'<table class="counts" id="latency">(.*?)</table>', html, re.S)
    assert latency and "<th>p50</th><td>under" in latency.group(1)

    preview = client.get("/actions/replay", params={"ref": str(dead)})
    action, fields = form_of(preview.text)
    assert submit(client, action, fields).status_code == 200
    audit = re.search(r'<table class="audit" id="audit">(.*?)</table>', client.get("/").text, re.S)
    assert audit, "no audit table"
    assert (
        "<td>anonymous</td><td>testclient</td>\n    "
        f"<td>replay</td><td><code>messages {dead}</code></td><td>1</td>" in audit.group(1)
    )


def test_outbox_status_lists_the_relays_alive(engine: sa.Engine, db_url: str) -> None:
    from relay import Relay

    registry = Registry()

    @registry.handler("orders.created")
    def deliver(message: Message) -> None:
        pass

    add(engine)
    with Relay(engine, registry, poll_interval=0.05, name="shop-relay-1"):
        wait_until(lambda: status_counts(engine) == {"delivered": 1}, what="delivery")
        wait_until(  # the heartbeat after the delivery
            lambda: Operations(engine).relays()[0].delivered == 1, timeout=20, what="the heartbeat"
        )
        result = CliRunner().invoke(outbox_cli, ["status", "--database-url", db_url])
        assert result.exit_code == 0, result.output
        assert "relays alive: 1" in result.output
        assert re.search(
            r"  shop-relay-1  up \d+s  last progress \d+s ago  delivered 1  failed 0  dead 0"
            r"  routes orders.created",
            result.output,
        ), result.output
        as_json = CliRunner().invoke(outbox_cli, ["status", "--json", "--database-url", db_url])
        assert json.loads(as_json.output)["relays"][0]["relay_id"] == "shop-relay-1"
    result = CliRunner().invoke(outbox_cli, ["status", "--database-url", db_url])
    assert "relays alive: 0" in result.output


# --- dead letters -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FakeRecord:
    """A Kafka record as the consumer read it (only what a dead letter keeps)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int | None = None


def dead_letter(engine: sa.Engine, group: str, topic: str, offset: int, value: bytes = b'{"n": 1}') -> None:
    from consumers._dead_letters import DeadLetters

    record = FakeRecord(
        topic, 0, offset, b"k-%d" % offset, value, [("outbox-content-type", b"application/json")]
    )
    with engine.begin() as conn:
        DeadLetters(tables_for()).add(
            conn, group=group, record=record, message_id=uuid.uuid4(), error="ValueError: <no>", attempts=3
        )


def test_dead_letters_by_group_and_one_of_them(engine: sa.Engine) -> None:
    for offset in range(3):
        dead_letter(engine, "billing", "invoices", offset)
    dead_letter(engine, "mail", "invoices", 0, value=b"<script>alert(1)</script>")
    client = TestClient(create_app(engine, allow_actions=True))
    page = client.get("/dead-letters").text
    assert re.search(r'<tr data-group="billing">.*?<td>3</td><td class="waiting">3</td>', page, re.S)
    assert 'id="no-kafka"' in page and 'id="replay-selected"' not in page  # no Kafka: nothing to replay to
    assert len(re.findall(r'<tr data-seq="\d+">', page)) == 4
    billing = client.get("/dead-letters", params={"group": "billing"}).text
    assert len(re.findall(r'<tr data-seq="\d+">', billing)) == 3
    seq = int(re.findall(r'<tr data-seq="(\d+)">', page)[-1])
    shown = client.get(f"/dead-letters/{seq}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown and "<script>" not in shown
    assert "<code>invoices[0]@0</code>" in shown and "ValueError: &lt;no&gt;" in shown
    hidden = TestClient(create_app(engine, hide_payloads=True)).get(f"/dead-letters/{seq}").text
    assert 'id="hidden"' in hidden and "alert(1)" not in hidden
    assert client.get("/dead-letters/999999").status_code == 404
    # with actions but no Kafka: the dry run says so, a POST changes nothing
    preview = client.get("/dead-letters/replay", params={"group": "billing"})
    assert 'id="no-kafka"' in preview.text and '<form method="post"' not in preview.text
    assert client.get("/dead-letters/replay").status_code == 400
    read_only = TestClient(create_app(engine))
    assert read_only.get("/dead-letters/replay", params={"seq": str(seq)}).status_code == 403
    from outbox.web._actions import Csrf

    keyed = TestClient(create_app(engine, allow_actions=True, secret=b"s" * 32))
    fields = [("seq", str(seq)), ("csrf", Csrf(b"s" * 32).token("anonymous"))]
    assert submit(keyed, "/dead-letters/replay", fields[:1]).status_code == 403  # no token
    assert submit(keyed, "/dead-letters/replay", fields).status_code == 409  # no Kafka to replay to


def test_replay_dead_letters_to_kafka_from_the_dashboard(
    engine: sa.Engine, kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    from outbox._runtime.kafka_settings import KafkaConnection
    from tests.kafka_check import read_all

    topic = f"invoices-{uuid.uuid4().hex[:8]}"
    for offset in range(3):
        dead_letter(engine, "billing", topic, offset)
    dead_letter(engine, "mail", topic, 7)
    app = create_app(engine, allow_actions=True, kafka=KafkaConnection(kafka_bootstrap))
    client = TestClient(app)
    listing = client.get("/dead-letters").text
    link = re.search(
        r'<tr data-group="billing">.*?<a class="action" href="([^"]+)">Replay 3…</a>', listing, re.S
    )
    assert link, listing
    preview = client.get(link.group(1).replace("&amp;", "&")).text
    assert dry_count(preview) == 3 and ">Replay 3 dead letters</button>" in preview
    action, fields = form_of(preview)
    dead_letter(engine, "billing", topic, 9)  # after the dry run: left for another replay
    with caplog.at_level("INFO", logger="outbox.web.audit"):
        done = submit(client, action, fields)
    assert '<h1 id="done">Replayed 3 dead letters</h1>' in done.text, done.text
    records = read_all(kafka_bootstrap, [topic], expect=3)
    assert sorted(r.key or "" for r in records) == ["k-0", "k-1", "k-2"]
    assert all(r.headers.get("outbox-replayed") == "1" and r.value == b'{"n": 1}' for r in records)
    assert Operations(engine).dead_letter_groups() == {"billing": (4, 1), "mail": (1, 1)}
    assert any("dashboard replay by anonymous" in r.getMessage() for r in caplog.records)
    assert "dead letters of group billing up to seq" in client.get("/").text  # the audit table


def test_time_range_and_go_to_a_message_and_its_trace(engine: sa.Engine) -> None:
    ids = [add(engine, "orders.created", {"n": i}) for i in range(4)]
    base = dt.datetime(2026, 5, 1, 12, 0)
    with engine.begin() as conn:
        for i, message_id in enumerate(ids):
            conn.execute(
                sa.update(T).where(T.c.id == message_id).values(created_at=base + dt.timedelta(hours=i))
            )
    traced = add(
        engine,
        "orders.created",
        headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    )
    client = TestClient(create_app(engine, trace_url="https://jaeger.example/trace/{trace_id}"))
    page = client.get("/messages", params={"since": "2026-05-01T13:00", "until": "2026-05-01T15:00"}).text
    assert seqs_on(page) == [seq_of(engine, ids[2]), seq_of(engine, ids[1])]
    assert 'name="since" type="datetime-local" step="1" value="2026-05-01T13:00"' in page
    with_offset = client.get("/messages", params={"since": "2026-05-01T15:00+02:00"}).text  # 13:00 UTC
    assert seqs_on(with_offset)[-1] == seq_of(engine, ids[1])
    assert client.get("/messages", params={"since": "yesterday"}).status_code == 400

    jump = client.get("/messages", params={"ref": str(ids[3])}, follow_redirects=False)
    assert jump.status_code == 303 and jump.headers["location"] == f"/messages/{ids[3]}"
    assert client.get("/messages", params={"ref": "nope"}).status_code == 400
    shown = client.get(f"/messages/{traced}").text
    assert '<a id="trace" href="https://jaeger.example/trace/4bf92f3577b34da6a3ce929d0e0e4736"' in shown
    assert 'id="trace"' not in client.get(f"/messages/{ids[0]}").text
    assert 'id="trace"' not in TestClient(create_app(engine)).get(f"/messages/{traced}").text


def test_overview_shows_the_doctors_findings_checked_in_the_background(engine: sa.Engine) -> None:
    client = TestClient(create_app(engine))
    first = client.get("/").text
    assert 'id="doctor-pending"' in first or 'id="doctor-summary"' in first

    def checked() -> str | None:
        html = client.get("/").text
        return html if 'id="doctor-summary"' in html else None

    html = wait_until(checked, timeout=30, what="the health checks")
    assert isinstance(html, str)
    rows = re.findall(r'<tr class="level-(\w+)"><td>(\w+)</td>', html)
    assert ("ok", "schema_version") in rows and ("ok", "tables") in rows, rows
