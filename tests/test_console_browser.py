"""The web console in a real browser: Debian's Chromium driven by Playwright against a real `streamer serve`.

One `streamer serve` plays the Hamilton clip live and looped with a gallery where Lin-Manuel Miranda is enrolled
(Alex Lacamoire, also on stage, is not: he is the recent unknown). Every test works on its own page; screenshots
go to out/console-*.png and the measured numbers to out/console-measurements.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
HAMILTON = "face_recognition/examples/short_hamilton_clip.mp4"
LIN = "Lin-Manuel Miranda"
STREAM = "stage"
# First start: models load, the detect worker starts, the clip reaches a face, recognition votes.
START_S = 120
MEASURED: dict[str, Any] = {}

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing: apt-get install chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install "
                               "playwright; the system Chromium is used, no browser download)")
expect = sync_api.expect


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def record(key: str, value: Any) -> None:
    """Numbers for the closing note, in out/console-measurements.json (merged across tests of one run)."""
    MEASURED[key] = value
    OUT.mkdir(exist_ok=True)
    (OUT / "console-measurements.json").write_text(json.dumps(MEASURED, indent=2) + "\n")


class Serve:
    """`streamer serve` in its own process group; the admin token it prints once on stderr."""

    TOKEN = re.compile(r"\b([A-Za-z0-9_\-]{20,})\s*$")

    def __init__(self, work: Path, gallery: Path, media_dir: Path, model_dir: Path, cache_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = work / "serve.yaml"
        config.write_text(
            f"sources:\n  - url: {media_dir / HAMILTON}\n    id: {STREAM}\n    live: true\n    loop: true\n"
            f"serve:\n  bind: 127.0.0.1:{self.port}\n"
            f"publish:\n  endpoint: tcp://127.0.0.1:{free_port()}\n"  # not the default 5556 another run may hold
        )
        self.stderr_path = work / "stderr.txt"
        env = {**os.environ, "STREAMER_MODEL_DIR": str(model_dir), "STREAMER_MODELS__CACHE_DIR": str(cache_dir),
               "PYTHONPATH": str(REPO)}
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamer", "serve", "--config", str(config), "--gallery", str(gallery)],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            )
        self.token = self._wait_for_token()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def _wait_for_token(self) -> str:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"streamer serve exited with {self.process.returncode}:\n{self.stderr()}")
            token = self._token(self.stderr_path.read_text(errors="replace").splitlines())
            if token is not None:
                try:
                    if httpx.get(f"{self.url}/login", timeout=2).status_code == 200:
                        return token
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        pytest.fail(f"streamer serve printed no admin token and served no /login within {START_S} s:\n{self.stderr()}")

    @classmethod
    def _token(cls, lines: list[str]) -> str | None:
        """The token on the line after the one announcing it (or at the end of that line)."""
        for i, line in enumerate(lines):
            if "admin token" in line.lower():
                for candidate in (line, lines[i + 1] if i + 1 < len(lines) else ""):
                    if match := cls.TOKEN.search(candidate.strip()):
                        return match.group(1)
        return None

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def close(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the supervisor's workers: the group this test started
        except ProcessLookupError:
            pass
        self.process.wait(10)
        return None


@pytest.fixture(scope="module")
def serve(tmp_path_factory, media_dir, lin_gallery, model_dir, cache_dir):
    work = tmp_path_factory.mktemp("console")
    gallery = work / "people.db"
    shutil.copyfile(lin_gallery, gallery)  # the tests enrol and delete: never in the session's shared gallery
    server = Serve(work, gallery, media_dir, model_dir, cache_dir)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, serve):
    """A logged-in page (session cookie from POST /api/v1/login, as the login page does)."""
    context = browser.new_context(base_url=serve.url, viewport={"width": 1280, "height": 860})
    assert context.request.post("/api/v1/login", data={"token": serve.token}).status == 204
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Whatever the Content-Security-Policy refuses (an inline script or style, an outside URL) is an error too.
    page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(target: Any, name: str) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"console-{name}.png"
    target.screenshot(path=str(path))
    return path


def navigation_ms(page: Any) -> dict[str, float]:
    """Navigation start to DOMContentLoaded and to the load event, from the Performance API."""
    page.wait_for_function("() => performance.getEntriesByType('navigation')[0]?.loadEventEnd > 0")
    timing = page.evaluate("""() => { const n = performance.getEntriesByType('navigation')[0];
        return {dom_content_loaded_ms: n.domContentLoadedEventEnd - n.startTime, load_ms: n.loadEventEnd - n.startTime}; }""")
    return {key: round(value, 1) for key, value in timing.items()}


def test_login_page_sets_an_httponly_cookie_and_keeps_the_token_nowhere(browser, serve):
    context = browser.new_context(base_url=serve.url, viewport={"width": 1280, "height": 860})
    try:
        page = context.new_page()
        refused: list[str] = []  # what the Content-Security-Policy blocked on the login page
        page.on("console", lambda msg: refused.append(msg.text) if "Content Security Policy" in msg.text else None)
        page.goto("/")
        expect(page).to_have_url(re.compile(r"/login$"))  # no session: the console sends you to log in
        record("login_page_load", navigation_ms(page))
        page.get_by_test_id("login-token").fill("not-the-token")
        page.get_by_test_id("login-submit").click()
        refusal = page.get_by_test_id("login-error")
        expect(refusal).to_be_visible()
        assert refusal.inner_text().strip(), "the refusal says nothing"
        shot(page, "login-refused")

        page.get_by_test_id("login-token").fill(serve.token)
        page.get_by_test_id("login-submit").click()
        expect(page).to_have_url(re.compile(r"/#/live$"))
        record("console_page_load", navigation_ms(page))
        expect(page.get_by_test_id("who")).to_contain_text("admin")

        cookie = next(c for c in context.cookies() if c["name"] == "streamer_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
        stored = page.evaluate("() => [document.cookie, JSON.stringify(localStorage), JSON.stringify(sessionStorage)]")
        assert all(serve.token not in value for value in stored), "the token is readable by page scripts"
        assert serve.token not in page.url

        page.get_by_test_id("logout").click()
        expect(page).to_have_url(re.compile(r"/login$"))
        assert page.request.get("/api/v1/people").status == 401, "logging out left the session valid"
        assert not refused, refused
    finally:
        context.close()


def frame_hashes(page: Any, testid: str, seconds: float) -> list[str]:
    """What the tile shows, sampled by drawing the <img> (the current MJPEG frame) onto a canvas."""
    return page.evaluate(
        """async ([testid, ms]) => {
            const img = document.querySelector(`[data-testid="${testid}"]`);
            const canvas = new OffscreenCanvas(64, 36); const g = canvas.getContext('2d');
            const seen = []; const end = performance.now() + ms;
            while (performance.now() < end) {
                g.drawImage(img, 0, 0, 64, 36);
                const px = g.getImageData(0, 0, 64, 36).data; let h = 0;
                for (let i = 0; i < px.length; i += 4) h = (h * 31 + px[i] + 7 * px[i + 1] + 13 * px[i + 2]) >>> 0;
                if (seen[seen.length - 1] !== h) seen.push(h);
                await new Promise(r => setTimeout(r, 20));
            }
            return seen.map(String);
        }""",
        [testid, seconds * 1000],
    )


def test_live_tile_shows_the_clip_moving(page, serve):
    page.goto("/#/live")
    tile = page.get_by_test_id(f"tile-{STREAM}")
    expect(tile).to_be_visible()
    expect(page.get_by_test_id(f"status-{STREAM}")).to_have_attribute("data-status", re.compile("connected"),
                                                                       timeout=START_S * 1000)
    image = page.get_by_test_id(f"live-{STREAM}")
    page.wait_for_function(f"() => document.querySelector('[data-testid=\"live-{STREAM}\"]').naturalWidth > 0",
                           timeout=START_S * 1000)
    first = hashlib.sha256(image.screenshot()).hexdigest()
    time.sleep(1.5)
    second = hashlib.sha256(image.screenshot()).hexdigest()
    assert first != second, "the live tile showed the same picture 1.5 s apart"
    changes = frame_hashes(page, f"live-{STREAM}", 4.0)
    record("live_tile_frames_shown_per_s", round((len(changes) - 1) / 4.0, 2))
    assert len(changes) >= 4, f"the tile changed only {len(changes) - 1} times in 4 s"
    expect(page.get_by_test_id(f"fps-{STREAM}")).not_to_have_text(re.compile(r"^0\.0 fps$"))
    shot(page, "live")

    # A phone: one column, no sideways scrolling, buttons big enough to touch.
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(500)
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth"), "sideways scroll on a phone"
    box = page.get_by_test_id(f"remove-{STREAM}").bounding_box()
    assert box is not None and box["height"] >= 40
    shot(page, "live-phone")


def test_events_list_names_lin_manuel_miranda(page, serve):
    page.goto("/#/events")
    expect(page.get_by_test_id("events-connection")).to_have_attribute("data-status", "connected")
    row = page.locator(f'[data-testid="event-row"][data-name="{LIN}"]').first
    expect(row).to_be_visible(timeout=START_S * 1000)
    text = row.inner_text()
    assert STREAM in text and re.search(r"score (0|1)\.\d\d", text), text
    # Live: the list grows while the page is open (the WebSocket), not only from the first fill.
    count = page.get_by_test_id("event-row").count()
    page.wait_for_function(f"() => document.querySelectorAll('[data-testid=event-row]').length > {count}",
                           timeout=60_000)
    page.get_by_test_id("filter-person").select_option(LIN)
    rows = page.get_by_test_id("event-row")
    assert rows.count() > 0
    assert set(rows.evaluate_all("rows => rows.map(r => r.dataset.name)")) == {LIN}
    page.get_by_test_id("filter-camera").select_option(STREAM)
    assert set(rows.evaluate_all("rows => rows.map(r => r.dataset.stream)")) == {STREAM}
    page.get_by_test_id("filter-person").select_option(label="Known people only")
    assert "unknown" not in set(rows.evaluate_all("rows => rows.map(r => r.dataset.name)"))
    page.get_by_test_id("filter-person").select_option("")
    shot(page, "events")


def test_enrol_from_upload_rename_and_delete_after_confirming(page, serve, media_dir):
    photos = media_dir / "face_recognition/examples"
    page.goto("/#/library")
    expect(page.get_by_test_id(f"person-{LIN}")).to_contain_text("1 face")

    # Refused: a group photo without choosing a face shows the server's sentence.
    page.get_by_test_id("enrol-name").fill("Group Photo")
    page.get_by_test_id("enrol-files").set_input_files(str(photos / "two_people.jpg"))
    page.get_by_test_id("enrol-submit").click()
    refusal = page.locator(".flash.error")
    expect(refusal).to_be_visible(timeout=60_000)  # the first upload loads the models
    assert "face" in refusal.inner_text().lower(), refusal.inner_text()
    expect(page.get_by_test_id("person-Group Photo")).to_have_count(0)
    shot(page, "library-refused")

    page.get_by_test_id("enrol-name").fill("Barack Obama")
    page.get_by_test_id("enrol-files").set_input_files([str(photos / "obama.jpg"), str(photos / "obama2.jpg")])
    page.get_by_test_id("enrol-submit").click()
    expect(page.get_by_test_id("person-Barack Obama")).to_contain_text("2 faces", timeout=60_000)

    page.get_by_test_id("rename-Barack Obama").click()
    page.get_by_test_id("rename-input-Barack Obama").fill("Obama")
    page.get_by_test_id("rename-save-Barack Obama").click()
    expect(page.get_by_test_id("person-Obama")).to_contain_text("2 faces")
    expect(page.get_by_test_id("person-Barack Obama")).to_have_count(0)

    page.get_by_test_id("delete-Obama").click()
    expect(page.get_by_test_id("confirm")).to_be_visible()
    shot(page, "library-confirm-delete")
    page.get_by_test_id("confirm-no").click()  # cancelled: nothing happens
    expect(page.get_by_test_id("person-Obama")).to_be_visible()
    page.get_by_test_id("delete-Obama").click()
    page.get_by_test_id("confirm-yes").click()
    expect(page.get_by_test_id("person-Obama")).to_have_count(0)
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth"), "sideways scroll on a phone"
    shot(page, "library-phone")
    with serve.api() as client:
        assert [p["name"] for p in client.get("/api/v1/people").json()["people"]] == [LIN]


def test_enrol_a_recent_unknown_with_one_click(page, serve):
    page.goto("/#/library")
    # Alex Lacamoire is on stage but not enrolled: his tracks are recent unknowns with a thumbnail. A track of
    # Lin-Manuel Miranda can be unknown for a moment before he is recognised: skip those.
    cards = page.locator('article[data-testid^="unknown-"]')
    expect(cards.first).to_be_visible(timeout=START_S * 1000)
    with serve.api() as client:
        lin = {(e["stream"], e["track"]) for e in
               client.get("/api/v1/events", params={"kind": "identity", "name": LIN, "limit": 5000}).json()["events"]}
        unknowns = [u for u in client.get("/api/v1/unknowns").json()["unknowns"] if (u["stream"], u["track"]) not in lin]
    assert unknowns, "every recent unknown was a track of Lin-Manuel Miranda"
    shot(page, "library-unknowns")
    refusals = []
    for unknown in unknowns[:12]:
        unknown_id = unknown["id"]
        card = page.get_by_test_id(f"unknown-{unknown_id}")
        if not card.count():
            continue  # expired or recognised meanwhile
        page.wait_for_function(f"() => document.querySelector('[data-testid=\"thumb-{unknown_id}\"]')?.naturalWidth > 0")
        page.get_by_test_id(f"unknown-name-{unknown_id}").fill("Alex Lacamoire")
        page.get_by_test_id(f"unknown-enrol-{unknown_id}").click()
        enrolled = page.get_by_test_id("person-Alex Lacamoire")
        refusal = page.locator(".flash.error")
        expect(enrolled.or_(refusal)).to_be_visible(timeout=60_000)
        if enrolled.count():
            break
        # Refused (too small, blurred or turned away): the sentence is shown; dismiss that one and go on.
        refusals.append(refusal.inner_text())
        page.get_by_test_id(f"unknown-dismiss-{unknown_id}").click()
        expect(card).to_have_count(0)
    else:
        pytest.fail(f"no recent unknown could be enrolled: {refusals}")
    record("unknown_enrol_refusals_before_success", refusals)
    expect(page.get_by_test_id("person-Alex Lacamoire")).to_contain_text("1 face")
    expect(page.get_by_test_id(f"unknown-{unknown_id}")).to_have_count(0)
    shot(page, "library-enrolled-unknown")
    with serve.api() as client:
        assert unknown_id not in [u["id"] for u in client.get("/api/v1/unknowns").json()["unknowns"]]


def test_add_and_remove_a_stream_from_the_live_page(page, serve):
    page.goto("/#/live")
    page.get_by_test_id("stream-url").fill("lavfi:testsrc2=size=320x180:rate=5")
    page.get_by_test_id("stream-id").fill("pattern")
    page.locator('[data-testid="add-stream"] button').click()
    expect(page.get_by_test_id("tile-pattern")).to_be_visible()
    expect(page.get_by_test_id("status-pattern")).to_have_attribute("data-status", "connected", timeout=30_000)
    page.get_by_test_id("stream-url").fill("lavfi:testsrc2=size=320x180:rate=5")
    page.get_by_test_id("stream-id").fill("no spaces allowed")
    page.locator('[data-testid="add-stream"] button').click()
    refusal = page.locator(".flash.error")
    expect(refusal).to_be_visible()  # the server's sentence, and no tile
    assert "id" in refusal.inner_text(), refusal.inner_text()
    expect(page.locator('[data-testid^="tile-"]')).to_have_count(2)
    shot(page, "live-two-streams")
    page.get_by_test_id("remove-pattern").click()
    page.get_by_test_id("confirm-yes").click()
    expect(page.get_by_test_id("tile-pattern")).to_have_count(0)
    expect(page.get_by_test_id(f"tile-{STREAM}")).to_be_visible()


# A grey picture whose brightness is its frame number: Y = 16 + 4 * (N mod 50), at 10 frames a second. The
# source is paced, so frame N is decoded at A + N / 10 s; A comes from the stream's frame counter.
CLOCK_RATE = 10
CLOCK_STEPS = 50
CLOCK = (f"lavfi:color=c=gray:size=320x240:rate={CLOCK_RATE},"
         f"geq=lum=16+4*(N-{CLOCK_STEPS}*floor(N/{CLOCK_STEPS})):cb=128:cr=128")
GREY_PER_STEP = 4 * 255 / 219  # limited-range Y to full-range grey


def test_live_tile_latency_from_decoded_to_shown(page, serve):
    """Frame decoded (source) to frame shown (the <img> in the browser), with a frame-numbered test picture."""
    with serve.api() as client:
        added_at = time.time()  # frame 0 cannot be decoded before the stream is asked for
        assert client.post("/api/v1/streams", json={"url": CLOCK, "id": "clock"}).status_code == 201
    try:
        page.goto("/#/live")
        expect(page.get_by_test_id("status-clock")).to_have_attribute("data-status", "connected", timeout=30_000)
        page.wait_for_function("() => document.querySelector('[data-testid=\"live-clock\"]').naturalWidth > 0")
        polls: list[tuple[float, float, int]] = []
        done = threading.Event()

        def poll_frames() -> None:  # (asked at, answered at, frames decoded so far), wall clock
            with serve.api() as client:
                while not done.is_set():
                    asked = time.time()
                    views = client.get("/api/v1/streams").json()["streams"]
                    polls.append((asked, time.time(), next(v["frames"] for v in views if v["id"] == "clock")))
                    time.sleep(0.05)

        poller = threading.Thread(target=poll_frames, daemon=True)
        poller.start()
        try:
            shown = page.evaluate("""async (ms) => {
                const img = document.querySelector('[data-testid="live-clock"]');
                const g = new OffscreenCanvas(8, 8).getContext('2d', { willReadFrequently: true });
                const seen = []; const end = performance.now() + ms; let last = -1;
                while (performance.now() < end) {
                    const w = img.naturalWidth, h = img.naturalHeight;
                    g.drawImage(img, w / 2 - 8, h / 2 - 8, 16, 16, 0, 0, 8, 8);  // the middle: no overlay there
                    const px = g.getImageData(0, 0, 8, 8).data; let sum = 0;
                    for (let i = 0; i < px.length; i += 4) sum += px[i + 1];
                    const grey = sum / 64;
                    if (Math.abs(grey - last) > 1.5) { seen.push([performance.timeOrigin + performance.now(), grey]); last = grey; }
                    await new Promise(r => setTimeout(r, 4));
                }
                return seen;
            }""", 5000)
        finally:
            done.set()
            poller.join(5)
    finally:
        with serve.api() as client:
            client.delete("/api/v1/streams/clock")
    # A, when frame 0 was decoded (frame N then at A + N / 10), lies between two bounds. Before: the stream's
    # "connected" event (the source opened; the worker may take seconds to get to it). After: the stream's frame counter, the detect worker's last report (sent now and
    # then, late on a busy machine), so a poll answering F frames proves frame F-1 was decoded before the
    # answer: A <= answered - (F-1)/10. Each frame's delay therefore lies between two numbers.
    assert len(polls) > 20 and len(shown) > 10, (len(polls), len(shown))
    with serve.api() as client:  # the source says "connected" once open, just before its first frame
        connected = [e["ts"] for e in client.get("/api/v1/events", params={"kind": "stream.status", "stream": "clock"})
                     .json()["events"] if e["status"] == "connected"]
    earliest = max([added_at, *connected[:1]])
    latest = min(answered - (frames - 1) / CLOCK_RATE for _, answered, frames in polls)
    assert earliest <= latest + 0.2, (earliest, latest)
    seen = []  # (shown at, frame number); the first sample is whatever was on screen when sampling began
    for at_ms, grey in shown[1:]:
        at = at_ms / 1000
        step = round(grey / GREY_PER_STEP) % CLOCK_STEPS
        newest = int((at - earliest) * CLOCK_RATE)  # no frame after this one can have been decoded by then
        seen.append((at, newest - (newest - step) % CLOCK_STEPS))
    latest = min([latest, *(at - number / CLOCK_RATE for at, number in seen)])  # nothing is shown before decoded
    numbers = [number for _, number in seen]
    lows = sorted((at - latest - number / CLOCK_RATE) * 1000 for at, number in seen)
    highs = sorted((at - earliest - number / CLOCK_RATE) * 1000 for at, number in seen)
    result = {"measured": True, "frames": len(lows),
              "median_ms_at_least": round(lows[len(lows) // 2]), "median_ms_at_most": round(highs[len(highs) // 2]),
              "p90_ms_at_least": round(lows[int(len(lows) * 0.9)]), "p90_ms_at_most": round(highs[int(len(highs) * 0.9)]),
              "frame_numbers_shown": numbers[:12],
              "what": "source frame decoded to the same frame drawn in the browser's <img> (10 fps grey clock); "
                      "bounds: frame 0 decoded after the stream's connected event and before the frame counter "
                      "said so"}
    record("live_tile_latency", result)
    assert result["median_ms_at_least"] < 2000, result


def test_api_docs_render_offline(page, serve):
    """/docs draws Swagger UI from files the server ships; any request beyond this server is refused here, as
    at an offline site, and counted."""
    outside: list[str] = []

    def only_local(route: Any) -> None:
        if route.request.url.startswith(serve.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto("/docs")
    expect(page.locator(".swagger-ui .title")).to_contain_text("streamer", timeout=30_000)
    expect(page.locator(".opblock-summary-path", has_text="/api/v1/strangers/{stranger_id}/promote")).to_be_visible()
    page.wait_for_load_state("networkidle")
    record("docs_page_load", navigation_ms(page))
    shot(page, "docs")
    assert outside == [], f"/docs reached beyond the server: {outside}"


def test_strangers_listed_and_promoted_from_the_library(page, serve):
    page.goto("/#/library")
    # Unknown tracks carry the stranger id the pipeline gave them; the strangers list shows those ids.
    expect(page.locator('article[data-testid^="unknown-"]').first).to_be_visible(timeout=START_S * 1000)
    expect(page.get_by_test_id("strangers-section")).to_be_visible()
    ids = page.locator('[data-testid^="unknown-stranger-"]').all_inner_texts()
    assert any(re.fullmatch(r"u-\d+", text) for text in ids), ids
    cards = page.locator('article[data-testid^="stranger-"]')
    expect(cards.first).to_be_visible(timeout=60_000)
    stranger = cards.first.get_attribute("data-testid").removeprefix("stranger-")
    with serve.api() as client:
        listed = {s["id"]: s for s in client.get("/api/v1/strangers").json()["strangers"]}
    assert stranger in listed
    if listed[stranger]["thumbnail"]:
        page.wait_for_function(f"() => document.querySelector('[data-testid=\"stranger-thumb-{stranger}\"]')?.naturalWidth > 0")
    shot(page.get_by_test_id("strangers-section"), "library-strangers")
    page.get_by_test_id(f"stranger-name-{stranger}").fill("Stranger Promoted")
    page.get_by_test_id(f"stranger-promote-{stranger}").click()
    expect(page.get_by_test_id("person-Stranger Promoted")).to_be_visible(timeout=30_000)
    expect(page.locator(".flash.ok")).to_contain_text(f"Enrolled {stranger} as Stranger Promoted")
    expect(page.get_by_test_id(f"stranger-{stranger}")).to_have_count(0)
    with serve.api() as client:
        assert stranger not in {s["id"] for s in client.get("/api/v1/strangers").json()["strangers"]}
        people = {p["name"]: p["faces"] for p in client.get("/api/v1/people").json()["people"]}
        # At least one face; fewer than listed when a track sent the same embedding twice (enrolled once).
        assert 1 <= people["Stranger Promoted"] <= 5  # recognition.stranger_faces
        assert client.delete("/api/v1/people/Stranger Promoted").status_code == 204
