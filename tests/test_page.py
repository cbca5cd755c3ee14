"""The live page (GET /) in a real browser: the OS's headless Chromium, driven by Playwright, against real gunicorn.

What a teacher does in front of a room, step by step: switch to unlocked (the page asks for the admin token),
release buyers from the page, see the oversold figure and overlapping bars; switch to locked, reset, release
again, see 0 and bars that follow one another; run the command-line load tester beside it and see the page
follow; a buyer named like HTML shown as text. Each time the page must agree with the store and with
``loadtest/timeline.py``, every request the browser made must have gone to a loopback address, and its console
must have stayed free of errors.

Needs Playwright's Python package (pinned in the test extra) and Chromium from the operating system (Debian's
``chromium``, which ``.ci/run`` installs). Without either the tests are skipped with one line; with CI=true
they fail. Each run saves a screenshot of the unlocked race to ``build/live-page.png`` (the README's copy is
``docs/live-page.png``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from loadtest.cluster import Cluster
from loadtest.embedded import EmbeddedService
from loadtest.postgres import ThrowawayPostgres
from loadtest.redis_server import ThrowawayRedis
from loadtest.timeline import bars_from_orders, overlapping_pairs, shared_reads
from tests.conftest import ADMIN_TOKEN, ROOT, Api, run_cli, start_cli

try:
    from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, Request, expect, sync_playwright
except ImportError:  # reported below, in one line, as a skip (or a failure with CI=true)
    PLAYWRIGHT_IMPORTED = False
else:
    PLAYWRIGHT_IMPORTED = True

SCREENSHOT = ROOT / "build" / "live-page.png"
WAIT_MS = 30_000  # the longest any one step may take before the test fails (the page polls every 250 ms)
MAX_BARS = 10_000  # app.js draws at most this many bars per run
VIEWPORT = {"width": 1280, "height": 800}  # a projector's
NOTHING_YET = "\N{EN DASH}"  # what the page shows in a figure it has not read yet
OVERLAP = 1.0  # in the drawing's units (800 across): bars that share less than this do not overlap

# Chromium looks up its vendor's hosts (updates, safe browsing, and so on) unless told not to: every host name
# but the loopback ones resolves to nothing, and the background services that would ask are switched off.
CHROMIUM_ARGUMENTS = [
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.*",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Chromium logs every HTTP error answer to a fetch as a console error. These are the ones the page is meant to
# meet here: a sold-out buyer (409), the admin token the race test leaves out, then gets wrong (401), and a buyer
# whose lease holder was superseded every time (503 too_many_conflicts, nothing sold).
EXPECTED_ANSWERS = {"409": ("/orders",), "401": ("/mode", "/reset"), "503": ("/orders",)}
BROWSER_LOGGED_ANSWER = re.compile(r"Failed to load resource: the server responded with a status of (\d{3})\b")


# --- Finding the browser ------------------------------------------------------------------------------------------


def _find_chromium() -> str | None:
    """The operating system's Chromium (TICKETLOCK_CHROMIUM names another), or None."""
    path = os.environ.get("TICKETLOCK_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and Path(path).is_file() else None


CHROMIUM = _find_chromium()
_MISSING = (
    "Playwright is not installed (pip install -e '.[test]')"
    if not PLAYWRIGHT_IMPORTED
    else "no Chromium found (Debian: apt-get install chromium)"
    if CHROMIUM is None
    else None
)
if _MISSING and os.environ.get("CI") != "true":
    pytest.skip(f"browser test skipped: {_MISSING}", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _browser_is_installed() -> None:
    """With CI=true, a missing Playwright or Chromium fails each test here (CI installs both; see .ci/run)."""
    if _MISSING:
        pytest.fail(f"browser test: {_MISSING}", pytrace=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium for this module, driven by Playwright (no browser of Playwright's own is downloaded)."""
    arguments = [*CHROMIUM_ARGUMENTS, *(["--no-sandbox"] if os.geteuid() == 0 else [])]  # its sandbox refuses root
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=arguments)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    """Real gunicorn, 4 workers, with an admin token, so that the page has to ask for it."""
    with EmbeddedService(
        workers=4, race_window_ms=20, admin_token=ADMIN_TOKEN, directory=tmp_path_factory.mktemp("page")
    ) as running:
        yield running


# --- A page and everything it did -----------------------------------------------------------------------------


@dataclass
class WatchedPage:
    """A browser tab on the service, recording every request, console error, page error and dialog."""

    page: Page
    url: str
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def open(self) -> Page:
        """Load the live page; it is served with the Content-Security-Policy that keeps buyers' names inert."""
        response = self.page.goto(self.url + "/")
        assert response is not None and response.status == 200
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy, policy
        expect(self.page.locator("#total")).not_to_have_text(NOTHING_YET, timeout=WAIT_MS)
        return self.page

    def on_request(self, request: Request) -> None:
        self.requests.append(request.url)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not _expected_answer(message):
            self.console_errors.append(f"{message.text} at {message.location.get('url')}")

    def on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def assert_clean(self) -> None:
        """Only loopback addresses were asked, and no script error, console error or dialog came up."""
        outside = [url for url in self.requests if not _is_loopback(url)]
        assert self.requests, "the browser made no request at all"
        assert not outside, f"the browser asked outside the loopback addresses: {outside}"
        assert not self.page_errors, self.page_errors
        assert not self.console_errors, self.console_errors
        assert not self.dialogs, f"a dialog opened (a buyer's name ran as script?): {self.dialogs}"


def _expected_answer(message: ConsoleMessage) -> bool:
    logged = BROWSER_LOGGED_ANSWER.match(message.text)
    path = urlsplit(message.location.get("url", "")).path
    return bool(logged) and path in EXPECTED_ANSWERS.get(logged.group(1) if logged else "", ())


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture
def watched(browser: Browser, live: EmbeddedService) -> Iterator[WatchedPage]:
    """A fresh tab on the file store's service that records what it does."""
    with _watching(browser, live.url) as watched:
        yield watched


@contextmanager
def _watching(browser: Browser, url: str) -> Iterator[WatchedPage]:
    """A fresh tab (its own storage, so no admin token carried over) that records what it does."""
    context = browser.new_context(viewport=VIEWPORT, service_workers="block")
    watched = WatchedPage(context.new_page(), url)
    context.on("request", watched.on_request)
    watched.page.on("console", watched.on_console)
    watched.page.on("pageerror", lambda error: watched.page_errors.append(str(error)))
    watched.page.on("dialog", watched.on_dialog)
    try:
        yield watched
    finally:
        context.close()


# --- The store's side, to hold the page against -------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    """What the service says, and the tally ``loadtest/checker.py`` defines from it."""

    total: int
    remaining: int
    orders: list[dict[str, Any]]

    @property
    def recorded_tickets(self) -> int:
        return sum(int(order["quantity"]) for order in self.orders)

    @property
    def sold_by_count(self) -> int:
        return self.total - self.remaining

    @property
    def oversold(self) -> int:
        return max(0, self.recorded_tickets - self.total)

    @property
    def lost_updates(self) -> int:
        return max(0, self.recorded_tickets - self.sold_by_count)


def read_store(url: str) -> Store:
    """Every order through the same feed the page reads, then the count (in that order, as the page does)."""
    api = Api(url)
    orders: list[dict[str, Any]] = []
    cursor = ""
    while True:
        feed = api.get("/orders", params={"after": cursor, "limit": 1000}).json()
        orders += feed["orders"]
        cursor = feed["cursor"]
        if len(feed["orders"]) < 1000:
            break
    tickets = api.get("/tickets").json()
    return Store(total=tickets["total"], remaining=tickets["remaining"], orders=orders)


def shown(number: int) -> str:
    """A number as the page writes it, with thousands separators."""
    return f"{number:,}"


def page_agrees_with_store(page: Page, url: str) -> Store:
    """Wait until the page has caught up with the store, then check every figure of its tally and its lanes."""
    store = read_store(url)
    expect(page.locator("#tally-orders")).to_have_text(shown(len(store.orders)), timeout=WAIT_MS)
    expect(page.locator("#remaining")).to_have_text(shown(store.remaining), timeout=WAIT_MS)
    expect(page.locator("#tally-tickets")).to_have_text(shown(store.total))
    expect(page.locator("#tally-sold")).to_have_text(shown(store.sold_by_count))
    expect(page.locator("#tally-recorded-tickets")).to_have_text(shown(store.recorded_tickets))
    expect(page.locator("#tally-oversold")).to_have_text(shown(store.oversold))
    expect(page.locator("#tally-lost")).to_have_text(shown(store.lost_updates))
    lanes = page.eval_on_selector_all("#timeline g.lane", "lanes => lanes.map(lane => Number(lane.dataset.workerPid))")
    assert sorted(lanes) == sorted({int(order["worker_pid"]) for order in store.orders})
    assert len(drawn_bars(page)) == min(len(store.orders), MAX_BARS)
    return store


# --- What the page draws ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrawnBar:
    worker_pid: int
    x: float
    width: float
    count_read: int


def drawn_bars(page: Page) -> list[DrawnBar]:
    rows = page.eval_on_selector_all(
        "#timeline g.lane",
        """lanes => lanes.flatMap(lane => [...lane.querySelectorAll('rect.bar')].map(rect => [
            Number(lane.dataset.workerPid), Number(rect.getAttribute('x')), Number(rect.getAttribute('width')),
            Number(rect.dataset.read)]))""",
    )
    return [DrawnBar(*row) for row in rows]


def drawn_overlaps(bars: list[DrawnBar]) -> list[tuple[DrawnBar, DrawnBar]]:
    """Pairs of bars in different lanes that cover the same stretch of the time axis."""
    ordered = sorted(bars, key=lambda bar: bar.x)
    pairs = []
    for index, first in enumerate(ordered):
        for second in ordered[index + 1 :]:
            if second.x >= first.x + first.width - OVERLAP:
                break
            if second.worker_pid != first.worker_pid:
                pairs.append((first, second))
    return pairs


def drawn_same_reads(page: Page) -> dict[int, int]:
    """The page's "N\N{MULTIPLICATION SIGN} read C" marks, as {C: N}."""
    labels = page.eval_on_selector_all("#timeline .same-read-label", "labels => labels.map(l => l.textContent)")
    marks = {}
    for label in labels:
        times, count = re.fullmatch(r"(\d+)\N{MULTIPLICATION SIGN} read (\d+)", label).groups()  # type: ignore[union-attr]
        marks[int(count)] = int(times)
    return marks


# --- What a teacher does on the page ------------------------------------------------------------------------------


def choose_mode(page: Page, name: str) -> None:
    page.get_by_label("Mode").select_option(name)


def set_race_window(page: Page, milliseconds: int) -> None:
    page.get_by_label("Race window (ms)").fill(str(milliseconds))
    page.get_by_role("button", name="Set", exact=True).click()
    expect(page.locator("#race-window")).to_have_text(str(milliseconds), timeout=WAIT_MS)


def reset(page: Page, tickets: int) -> None:
    page.get_by_label("Tickets").fill(str(tickets))
    page.get_by_role("button", name="Reset", exact=True).click()
    expect(page.locator("#message")).to_have_text(f"Reset: {tickets} tickets for sale, every order cleared.")
    expect(page.locator("#tally-orders")).to_have_text("0")
    expect(page.locator("#timeline rect.bar")).to_have_count(0)


@dataclass(frozen=True)
class Release:
    told_yes: int
    in_flight_together: int


def release_buyers(page: Page, buyers: int) -> Release:
    """Click "Release the buyers" and wait until every one of them has its answer."""
    page.get_by_label("Buyers").fill(str(buyers))
    button = page.get_by_role("button", name="Release the buyers")
    button.click()
    expect(page.locator("#release-result")).to_contain_text(f"{buyers} buyers released:", timeout=WAIT_MS)
    expect(button).to_be_enabled()
    told_yes = re.fullmatch(rf"(\d+) of {buyers}", page.locator("#told-yes").inner_text())
    assert told_yes, page.locator("#told-yes").inner_text()
    return Release(int(told_yes.group(1)), int(page.locator("#in-flight").inner_text()))


# --- The tests ----------------------------------------------------------------------------------------------------


def test_the_page_shows_the_race_unlocked_and_no_overlap_locked(watched: WatchedPage, live: EmbeddedService) -> None:
    page = watched.open()
    offered = [mode["name"] for mode in Api(live.url).get("/modes").json()["modes"] if mode["available"]]
    assert page.locator("#mode-select option").evaluate_all("options => options.map(o => o.value)") == offered

    switch_to_unlocked_asking_for_the_token(page)
    set_race_window(page, 50)
    the_page_shows_an_unlocked_race(page, live.url)
    # Locked: the same buyers, one sale at a time; the token is already known, so nothing is asked.
    choose_mode(page, "locked")
    expect(page.locator("#mode")).to_have_text("locked")
    the_page_shows_locked_sales_one_after_another(page, live.url)
    expect(page.locator("#token-form")).to_be_hidden()
    watched.assert_clean()


def switch_to_unlocked_asking_for_the_token(page: Page) -> None:
    """The service has an admin token: the first change asks for it, a wrong one is refused in clear words, the
    right one is kept for this tab only."""
    choose_mode(page, "unlocked")
    expect(page.locator("#token-why")).to_contain_text("needs its admin token")
    expect(page.locator("#message")).to_contain_text("401")
    page.get_by_label("Admin token").fill("not-the-token")
    page.get_by_role("button", name="Use it in this tab").click()
    expect(page.locator("#token-why")).to_contain_text("The admin token was refused (401)")
    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Use it in this tab").click()
    expect(page.locator("#message")).to_have_text("Mode is now unlocked.")
    expect(page.locator("#mode")).to_have_text("unlocked")
    expect(page.locator("#token-form")).to_be_hidden()
    kept = page.evaluate("[sessionStorage.getItem('ticketlock-admin-token'), localStorage.length]")
    assert kept == [ADMIN_TOKEN, 0], "the token is kept for this tab only"


def the_page_shows_an_unlocked_race(page: Page, url: str) -> None:
    """Unlocked: buyers that reach the server together read the same count and each write count - 1; the page
    shows the oversell, the overlapping bars and the shared reads the store's orders hold (and saves a screenshot)."""
    for _attempt in range(3):  # a browser sends only six at once; one release almost always suffices
        reset(page, 10)
        release = release_buyers(page, 100)
        store = page_agrees_with_store(page, url)
        if store.oversold:
            break
    assert store.oversold > 0, "three releases of 100 buyers, unlocked, never oversold"
    assert release.told_yes == len(store.orders) > 10
    assert 2 <= release.in_flight_together <= 6, "Chromium opens at most six connections to one site"
    expect(page.locator("#tally-oversold")).to_have_class("unsafe")
    bars = drawn_bars(page)
    assert drawn_overlaps(bars), "unlocked, bars of different workers overlap"
    server_bars = bars_from_orders(store.orders)
    assert drawn_same_reads(page) == {count: len(group) for count, group in shared_reads(server_bars).items()}
    assert sorted(bar.count_read for bar in bars) == sorted(bar.count_read for bar in server_bars)
    expect(page.locator("#legend")).to_contain_text("read by several sales at once")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOT, full_page=True)


def the_page_shows_locked_sales_one_after_another(page: Page, url: str) -> None:
    """Locked: 100 buyers for 10 tickets sell exactly 10, and the page draws ten bars that never overlap."""
    reset(page, 10)
    release = release_buyers(page, 100)
    store = page_agrees_with_store(page, url)
    assert (release.told_yes, len(store.orders), store.oversold, store.lost_updates) == (10, 10, 0, 0)
    expect(page.locator("#tally-oversold")).to_have_text("0")
    expect(page.locator("#tally-oversold")).to_have_class("safe")
    expect(page.locator("#verdict")).to_have_text("Correct so far: every sale is in the count, nothing oversold.")
    bars = drawn_bars(page)
    assert sorted(bar.count_read for bar in bars) == list(range(1, 11))
    assert not overlapping_pairs(bars_from_orders(store.orders))
    assert not drawn_overlaps(bars), "locked, each bar starts where another ended"
    assert drawn_same_reads(page) == {}
    expect(page.locator("#legend")).to_have_text(
        "No two sales overlapped: each one read the count the previous one wrote."
    )


BUYERS = 2000


def test_the_page_follows_the_command_line_load_tester(watched: WatchedPage, live: EmbeddedService) -> None:
    page = watched.open()
    admin = Api(live.url, ADMIN_TOKEN)
    admin.reset(tickets=10)
    answer = Api(live.url).post("/orders", {"buyer": "before the load tester"})
    assert answer.status_code == 201, answer.text
    expect(page.locator("#latest .buyer").first).to_have_text("before the load tester", timeout=WAIT_MS)

    # Its phases reset the store under the page: the page must start over each time, and end where it ends.
    completed = run_cli("--url", live.url, "--token", ADMIN_TOKEN, "--race-window-ms", "20", "--json")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    locked = json.loads(completed.stdout)["phases"][-1]
    assert locked["mode"] == "locked"
    store = page_agrees_with_store(page, live.url)
    assert (len(store.orders), store.oversold, store.lost_updates) == (
        locked["check"]["orders_recorded"],
        locked["check"]["oversold"],
        locked["check"]["lost_updates"],
    )
    expect(page.locator("#mode")).to_have_text("locked")
    expect(page.get_by_text("before the load tester")).to_have_count(0)

    # Thousands of orders, unlocked, as fast as the service sells: the page follows while the load runs. As many
    # tickets as buyers, so that every buyer gets one whatever the race does: exactly BUYERS orders.
    tester = start_cli(
        "--url", live.url, "--token", ADMIN_TOKEN, "--modes", "unlocked", "--race-window-ms", "0",
        "--buyers", str(BUYERS), "--tickets", str(BUYERS), "--concurrency", "16", "--quiet",
    )  # fmt: skip
    seen_while_running = []
    try:
        while tester.poll() is None:
            seen_while_running.append((page.locator("#total").inner_text(), page.locator("#tally-orders").inner_text()))
            page.wait_for_timeout(200)
    finally:
        stdout, stderr = tester.communicate(timeout=120)
    assert tester.returncode == 0, stdout + stderr
    assert any(
        total == shown(BUYERS) and orders not in ("0", NOTHING_YET, shown(BUYERS))
        for total, orders in seen_while_running
    ), f"the page never showed the run in progress: {seen_while_running}"
    store = page_agrees_with_store(page, live.url)
    assert len(store.orders) == BUYERS
    watched.assert_clean()


HOSTILE_NAMES = ["<img src=x onerror=alert(1)>", "</title><script>alert(2)</script><b>bold?</b>"]


def test_a_buyer_named_like_html_is_shown_as_text_and_never_runs(watched: WatchedPage, live: EmbeddedService) -> None:
    admin = Api(live.url, ADMIN_TOKEN)
    admin.put("/mode", {"mode": "locked"}).raise_for_status()
    admin.reset(tickets=10)
    for name in HOSTILE_NAMES:
        answer = Api(live.url).post("/orders", {"buyer": name})
        assert answer.status_code == 201, answer.text

    page = watched.open()
    expect(page.locator("#latest .buyer")).to_have_text(list(reversed(HOSTILE_NAMES)), timeout=WAIT_MS)
    tooltips = page.eval_on_selector_all("#timeline rect.bar title", "titles => titles.map(t => t.textContent)")
    for name in HOSTILE_NAMES:
        assert any(tooltip.startswith(f"{name}: read ") for tooltip in tooltips), tooltips
    elements = page.evaluate("[...document.querySelectorAll('img, b, script')].map(e => e.outerHTML)")
    assert elements == ['<script src="/page/app.js" defer=""></script>'], "a name became markup"
    watched.assert_clean()


# --- Under a lease ------------------------------------------------------------------------------------------------

LEASE_MS, LONGER_THAN_THE_LEASE_MS = 150, 250


@pytest.fixture(scope="module")
def leasing(postgres: ThrowawayPostgres, redis_server: ThrowawayRedis) -> Iterator[Cluster]:
    """One host of four workers on the session's PostgreSQL, holding a lease of LEASE_MS in its Redis."""
    environment = {"TICKETLOCK_LEASE_MS": str(LEASE_MS), "TICKETLOCK_LOCK_TIMEOUT": "2"}
    with Cluster(
        workers=4, store="postgres", database_url=postgres.url, redis_url=redis_server.url, environment=environment
    ) as running:
        yield running


def test_the_page_marks_sales_past_their_lease_and_the_stale_writes_a_fencing_store_refused(
    browser: Browser, leasing: Cluster
) -> None:
    url = leasing.urls[0]
    api = Api(url)
    api.put("/mode", {"mode": "lease", "race_window_ms": LONGER_THAN_THE_LEASE_MS})
    api.reset(tickets=10)
    with _watching(browser, url) as watched:
        page = watched.open()
        release_buyers(page, 12)
        late = [order for order in api.all_orders() if order["timing"]["wrote_at"] > order["timing"]["lease_until"]]
        expect(page.locator("#timeline rect.bar.outlived")).to_have_count(len(late), timeout=WAIT_MS)
        assert late and "sold after their lease ran out" in page.locator("#legend").inner_text()

        api.put("/mode", {"mode": "fenced-lease"})
        reset(page, 10)
        release_buyers(page, 6)
        refused = api.get("/refusals").json()["refusals"]
        expect(page.locator("#timeline rect.bar.refused")).to_have_count(len(refused), timeout=WAIT_MS)
        assert refused and "stale writes the store refused" in page.locator("#legend").inner_text()
        watched.assert_clean()
