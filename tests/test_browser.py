"""The dashboard in a real browser: headless Chromium (Debian's package) driven by Playwright, against a real
``outbox web`` process on PostgreSQL, with a real relay delivering what the dashboard replays.

The flows a person walks: open the overview, follow the dead count, open a message, replay it through its
dry run and confirmation, and watch the running relay deliver it; replay everything a filter matches;
see a parked key on *Keys*, replay its head and watch the key drain in order; purge a selection. And the
refusals: a read-only dashboard offers no action and refuses a forged POST (403); a form from another
site is refused even with a valid token; without the CSRF token, 403; with basic auth, 401 without
credentials. The dashboard mounted in a FastAPI application keeps its links under the mount.

Screenshots of each page go to ``$OUTBOX_SCREENSHOTS`` when set (``docs/img`` holds the ones the docs
show), else to the test's temporary directory.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect as playwright_expect
from playwright.sync_api import sync_playwright

import outbox
from consumers import Registry
from outbox._message import Message
from outbox._schema import tables_for
from outbox.admin import Operations
from relay import Relay
from tests.conftest import ROOT, make_database, status_counts, wait_until
from tests.kafka_broker import free_port

CHROMIUM = os.environ.get("OUTBOX_TEST_CHROMIUM", "/usr/bin/chromium")
#: as the machine notes say: without the background-networking flags Chromium keeps dialling out, and a
#: closed network refuses it many times a second
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
T = tables_for().messages


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium package (apt-get install "
            "chromium), or set OUTBOX_TEST_CHROMIUM to a Chromium binary",
            pytrace=False,
        )
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    context = chromium.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(15_000)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def shots(tmp_path: Path) -> Callable[[Any, str], None]:
    folder = Path(os.environ.get("OUTBOX_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)

    def shot(page: Any, name: str) -> None:
        page.screenshot(path=str(folder / f"web-{name}.png"), full_page=True)

    return shot


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[tuple[str, sa.Engine]]:
    url, drop = make_database("postgresql", tmp_path)
    engine = outbox.create_engine(url)
    with engine.begin() as conn:
        outbox.upgrade(conn)
    try:
        yield url, engine
    finally:
        engine.dispose()
        drop()


class Dashboard:
    """A real ``outbox web`` process on a free port."""

    def __init__(self, url: str, *args: str, env: dict[str, str] | None = None, module: str | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = (
            [sys.executable, "-m", "uvicorn", module, "--port", str(self.port), "--log-level", "warning"]
            if module
            else [sys.executable, "-m", "outbox", "web", "--port", str(self.port), *args]
        )
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "OUTBOX_DATABASE_URL": url, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_until(self.answers, timeout=30, what="the dashboard to answer")

    def answers(self) -> bool:
        assert self.process.poll() is None, self.process.communicate()[1].decode()
        try:
            urllib.request.urlopen(self.base + "/", timeout=2).close()
        except urllib.error.HTTPError:
            return True  # it answers (401, 404): that is enough
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def stop(self) -> str:
        self.process.terminate()
        _, stderr = self.process.communicate(timeout=30)
        return stderr.decode()


@pytest.fixture
def dashboards() -> Iterator[Callable[..., Dashboard]]:
    started: list[Dashboard] = []

    def start(url: str, *args: str, **kwargs: Any) -> Dashboard:
        started.append(Dashboard(url, *args, **kwargs))
        return started[-1]

    yield start
    for dashboard in started:
        if dashboard.process.poll() is None:
            dashboard.process.kill()
            dashboard.process.communicate()


class Shop:
    """A relay that delivers ``orders.*`` and ``payments.*``, failing while ``broken``: one attempt, then
    dead (orders) or parked (payments: strict order). ``delivered``: payloads' ``n`` in delivery order."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.broken = True
        self.delivered: list[tuple[str, int]] = []
        registry = Registry()

        @registry.handler("orders.*", max_attempts=1)
        def orders(message: Message) -> None:
            self.handle(message)

        @registry.handler("payments.*", max_attempts=1, strict_order=True)
        def payments(message: Message) -> None:
            self.handle(message)

        self.relay = Relay(engine, registry, poll_interval=0.05)

    def handle(self, message: Message) -> None:
        if self.broken:
            raise RuntimeError("the payment service is down")
        self.delivered.append((message.topic, int(message.payload["n"])))

    def add(self, topic: str, n: int, key: str | None = None) -> uuid.UUID:
        with self.engine.begin() as conn:
            return outbox.add(conn, topic, {"n": n}, key=key)

    def seq(self, message_id: uuid.UUID) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(T.c.seq).where(T.c.id == message_id)).scalar_one())

    def settle(self, **expected: int) -> None:
        wait_until(
            lambda: status_counts(self.engine) == expected,
            timeout=30,
            what=str(expected),
            explain=lambda: str(status_counts(self.engine)),
        )


@pytest.fixture
def shop(pg: tuple[str, sa.Engine]) -> Iterator[Shop]:
    shop = Shop(pg[1])
    try:
        yield shop
    finally:
        shop.relay.stop()


def reload_until(page: Any, selector: str, text: str, timeout: float = 30) -> None:
    """Reload ``page`` until ``selector`` reads ``text``: a person watching the page."""

    def shows() -> bool:
        page.reload()
        found = page.locator(selector)
        return found.count() > 0 and found.first.inner_text().strip() == text

    wait_until(shows, timeout=timeout, interval=0.3, what=f"{selector} to read {text!r}")


def test_replay_a_dead_message_and_watch_the_relay_deliver_it(
    shop: Shop, pg: tuple[str, sa.Engine], page: Any, dashboards: Callable[..., Dashboard], shots: Any
) -> None:
    for n in range(3):
        shop.add("orders.created", n, key=f"customer-{n}")
    dead = shop.add("orders.created", 99, key="customer-9")
    shop.relay.start()
    shop.settle(dead=4)
    shop.broken = False
    for n in range(3, 6):
        shop.add("orders.created", n)
    shop.settle(delivered=3, dead=4)
    web = dashboards(pg[0], "--allow-actions")
    wait_until(  # the relay's heartbeat has written what it did
        lambda: [(r.delivered, r.dead) for r in Operations(pg[1]).relays()] == [(3, 4)], what="a heartbeat"
    )

    page.goto(web.base + "/")
    assert page.locator('a[data-status="dead"]').inner_text() == "4"
    playwright_expect(page.locator("#doctor-summary")).to_be_visible(timeout=20_000)  # live update
    assert page.locator("#relays tbody tr").count() == 1
    assert "3 delivered, 0 failed, 4 dead" in page.locator("#chart-1 figcaption").inner_text()
    shots(page, "overview")
    page.click('a[data-status="dead"]')
    assert page.locator("tr[data-seq]").count() == 4
    shots(page, "messages")
    seq = shop.seq(dead)
    page.click(f'tr[data-seq="{seq}"] td:nth-child(2) a')
    assert page.locator("#status").inner_text() == "dead"
    assert "RuntimeError: the payment service is down" in page.locator("#last-error").inner_text()
    shots(page, "message")

    page.click("#replay")
    assert page.locator("h1").inner_text() == "Replay 1 message?"
    assert page.locator("#dry-count").inner_text() == "1"
    shots(page, "confirm")
    page.click("#confirm")
    assert page.locator("#done").inner_text() == "Replayed 1 message"
    page.click("text=Back to the message")
    reload_until(page, "#status", "delivered")
    assert ("orders.created", 99) in shop.delivered
    audit = web.stop()
    assert f"dashboard replay by anonymous from 127.0.0.1: messages {seq} -> 1 message(s)" in audit


def test_replay_everything_a_filter_matches_after_its_dry_run_count(
    shop: Shop, pg: tuple[str, sa.Engine], page: Any, dashboards: Callable[..., Dashboard]
) -> None:
    for n in range(7):
        shop.add("orders.created", n)
    shop.add("payments.captured", 100, key="account-1")
    shop.relay.start()
    shop.settle(dead=7, parked=1)
    shop.broken = False
    web = dashboards(pg[0], "--allow-actions")

    page.goto(web.base + "/messages")
    page.check('input[name="status"][value="dead"]')
    page.fill('input[name="topic"]', "orders.*")
    page.click("text=Filter")
    assert page.locator("tr[data-seq]").count() == 7
    page.click("#replay-matching")
    assert page.locator("#dry-count").inner_text() == "7"
    assert page.locator("#confirm").inner_text() == "Replay 7 messages"
    page.click("#confirm")
    assert page.locator("#done").inner_text() == "Replayed 7 messages"
    shop.settle(delivered=7, parked=1)  # the parked payment did not match the filter
    assert sorted(n for _, n in shop.delivered) == list(range(7))


def test_a_parked_key_on_keys_replay_its_head_and_watch_it_drain(
    shop: Shop, pg: tuple[str, sa.Engine], page: Any, dashboards: Callable[..., Dashboard], shots: Any
) -> None:
    for n in range(6):
        shop.add("payments.captured", n, key="account-7")
    shop.relay.start()
    shop.settle(parked=1, pending=5)
    shop.broken = False
    web = dashboards(pg[0], "--allow-actions")

    page.goto(web.base + "/")
    page.click("text=Keys")
    row = page.locator('tr[data-key="account-7"]')
    assert row.locator(".waiting").inner_text() == "5"
    assert row.locator(".status-parked").inner_text() == "parked"
    shots(page, "keys")
    row.locator("text=Replay head").click()
    assert page.locator("#confirm").inner_text() == "Replay 1 message"
    page.click("#confirm")
    page.click("text=Keys")
    reload_until(page, "#no-held-keys", "No key is held.")
    shop.settle(delivered=6)
    assert shop.delivered == [("payments.captured", n) for n in range(6)]  # the key in order


def test_purge_a_selection(
    shop: Shop, pg: tuple[str, sa.Engine], page: Any, dashboards: Callable[..., Dashboard], shots: Any
) -> None:
    ids = [shop.add("orders.created", n) for n in range(4)]
    shop.relay.start()
    shop.settle(dead=4)
    web = dashboards(pg[0], "--allow-actions")
    page.goto(web.base + "/messages?status=dead")
    for message_id in ids[:2]:
        page.check(f'input[name="ref"][value="{shop.seq(message_id)}"]')
    page.click("#purge-selected")
    assert page.locator("#confirm").inner_text() == "Purge 2 messages"
    page.click("#confirm")
    assert page.locator("#done").inner_text() == "Purged 2 messages"
    shots(page, "done")
    assert status_counts(pg[1]) == {"dead": 2}


def test_refusals_read_only_forged_cross_site_and_without_token(
    shop: Shop, pg: tuple[str, sa.Engine], page: Any, dashboards: Callable[..., Dashboard], tmp_path: Path
) -> None:
    dead = shop.add("orders.created", 1)
    shop.relay.start()
    shop.settle(dead=1)
    seq = str(shop.seq(dead))

    read_only = dashboards(pg[0])
    page.goto(f"{read_only.base}/messages/{seq}")
    assert page.locator("#read-only").is_visible()
    assert page.locator("#replay").count() == 0 and page.locator("input[type=checkbox]").count() == 0
    forged = page.request.post(f"{read_only.base}/actions/replay", form={"ref": seq, "csrf": "1.0"})
    assert forged.status == 403

    web = dashboards(pg[0], "--allow-actions")
    no_token = page.request.post(f"{web.base}/actions/replay", form={"ref": seq})
    assert no_token.status == 403

    # another site's page posting to the dashboard, even with a token it got somehow: refused
    page.goto(f"{web.base}/actions/replay?ref={seq}")
    token = page.locator('input[name="csrf"]').get_attribute("value")
    (tmp_path / "evil.html").write_text(
        f'<form method="post" action="{web.base}/actions/replay"><input name="ref" value="{seq}">'
        f'<input name="csrf" value="{token}"><button id="go">win a prize</button></form>'
    )
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://localhost:{evil.server_port}/evil.html")
        with page.expect_response(lambda r: "/actions/replay" in r.url) as answer:
            page.click("#go")
        assert answer.value.status == 403
        assert "did not come from this dashboard" in page.content()
    finally:
        evil.shutdown()
    assert status_counts(pg[1]) == {"dead": 1}


def test_basic_auth_in_the_browser(
    pg: tuple[str, sa.Engine], chromium: Any, dashboards: Callable[..., Dashboard]
) -> None:
    web = dashboards(pg[0], env={"OUTBOX_WEB_AUTH": "ops:long-secret"})
    anonymous = chromium.new_context()
    try:
        page = anonymous.new_page()
        # Chromium shows its own error page for a 401 it has no credentials for
        with page.expect_response(web.base + "/") as answer, contextlib.suppress(PlaywrightError):
            page.goto(web.base + "/")
        assert answer.value.status == 401
        assert answer.value.headers["www-authenticate"].startswith("Basic")
    finally:
        anonymous.close()
    signed_in = chromium.new_context(http_credentials={"username": "ops", "password": "long-secret"})
    try:
        answer = signed_in.new_page().goto(web.base + "/")
        assert answer.status == 200
    finally:
        signed_in.close()


def test_mounted_in_a_fastapi_application(
    pg: tuple[str, sa.Engine], page: Any, dashboards: Callable[..., Dashboard]
) -> None:
    with pg[1].begin() as conn:
        message_id = outbox.add(conn, "orders.created", {"n": 1}, key="k")
    host = dashboards(pg[0], module="tests.apps.web_host:app")
    page.goto(host.base + "/")
    assert '"service":"shop"' in page.content()
    page.goto(host.base + "/ops/outbox/")
    assert page.title() == "Overview · shop outbox"
    page.click("nav >> text=Messages")
    assert page.url == host.base + "/ops/outbox/messages"
    page.click(f"text={message_id}")
    assert page.url.startswith(host.base + "/ops/outbox/messages/")
    assert page.locator("#status").inner_text() == "pending"
    page.click("nav >> text=Keys")
    assert page.locator("#no-held-keys").is_visible()


class InProcess:
    """The dashboard app served by uvicorn on a thread of this process (for settings only code has)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, port=self.port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=30, what="uvicorn to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_pages_update_live_until_paused_and_show_local_times(
    shop: Shop, pg: tuple[str, sa.Engine], chromium: Any
) -> None:
    from outbox.web import create_app

    shop.broken = False
    shop.add("orders.created", 1)
    served = InProcess(create_app(pg[1], refresh=0.5))
    context = chromium.new_context(timezone_id="Asia/Tokyo")
    context.set_default_timeout(15_000)
    try:
        page = context.new_page()
        page.goto(served.base + "/")
        delivered = page.locator('a[data-status="delivered"]')
        assert delivered.inner_text() == "0"
        assert page.locator("#live-status").inner_text() == "live"
        shop.relay.start()  # a relay delivers: the open page shows it without a reload
        playwright_expect(delivered).to_have_text("1", timeout=15_000)
        utc = page.locator("time").first
        assert utc.inner_text().endswith(" UTC")
        title = utc.get_attribute("title") or ""
        assert title.endswith("(your local time)"), title  # Tokyo's time, nine hours ahead

        page.click("#live")  # paused: nothing changes until resumed
        assert page.locator("#live-status").inner_text() == "paused"
        shop.add("orders.created", 2)
        shop.settle(delivered=2)
        page.wait_for_timeout(2_000)
        assert delivered.inner_text() == "1"
        page.click("#live")
        playwright_expect(delivered).to_have_text("2", timeout=15_000)
    finally:
        context.close()
        served.stop()


def test_replay_a_consumer_groups_dead_letters(
    pg: tuple[str, sa.Engine],
    page: Any,
    dashboards: Callable[..., Dashboard],
    kafka_bootstrap: str,
    shots: Any,
) -> None:
    from consumers._dead_letters import DeadLetters
    from tests.kafka_check import read_all
    from tests.test_web import FakeRecord

    topic = f"invoices-{uuid.uuid4().hex[:8]}"
    with pg[1].begin() as conn:
        for offset in range(3):
            record = FakeRecord(topic, 0, offset, b"invoice-%d" % offset, b'{"total": 12}', [])
            DeadLetters(tables_for()).add(
                conn,
                group="billing",
                record=record,
                message_id=uuid.uuid4(),
                error="KeyError: 'vat'",
                attempts=5,
            )
    web = dashboards(pg[0], "--allow-actions", "--kafka-bootstrap-servers", kafka_bootstrap)
    page.goto(web.base + "/")
    page.click("nav >> text=Dead letters")
    assert page.locator('tr[data-group="billing"] .waiting').inner_text() == "3"
    shots(page, "dead-letters")
    page.click('tr[data-group="billing"] >> text=Replay 3…')
    assert page.locator("#confirm").inner_text() == "Replay 3 dead letters"
    page.click("#confirm")
    assert page.locator("#done").inner_text() == "Replayed 3 dead letters"
    records = read_all(kafka_bootstrap, [topic], expect=3)
    assert sorted(r.key or "" for r in records) == ["invoice-0", "invoice-1", "invoice-2"]
    page.click("text=Dead letters")
    assert page.locator('tr[data-group="billing"] .waiting').inner_text() == "0"
