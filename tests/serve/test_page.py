"""The page at / in headless Chromium: typing text shows the model's predictions live."""

import shutil
import threading
import time

import httpx
import pytest
import uvicorn
from serve_helpers import free_port

from rnnkit.serve import ServeOptions, create_app
from rnnkit.train.runs import load_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on this machine")


class ThreadServer:
    """uvicorn serving an app on a loopback port from a thread of this process."""

    def __init__(self, app) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")),  # an empty profile
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def browser_page(browser):
    page = browser.new_page()
    yield page
    page.close()


def serve(run_dir, **options) -> ThreadServer:
    return ThreadServer(create_app(load_run(run_dir), ServeOptions(**options)))


def test_typing_shows_next_character_suggestions_and_a_plot(lm_run, browser_page):
    server = serve(lm_run, top_k=3)
    try:
        page = browser_page
        page.goto(server.url + "/")
        page.wait_for_selector("#text:not([disabled])", timeout=20000)
        page.type("#text", "to be", delay=20)
        page.wait_for_function(
            "document.querySelector('polyline') && "
            "document.querySelector('polyline').getAttribute('points').split(' ').length === 5",
            timeout=20000,
        )
        shown = page.locator(".suggestion").all_inner_texts()
        expected = httpx.post(f"{server.url}/v1/predict", json={"input": "to be"}).json()
        top = expected["outputs"][-1]["top"]
        visible = {" ": "\u2423", "\n": "\u23ce"}
        assert shown == [f"{visible.get(name, name)} {100 * p:.1f}%" for name, p in top]
        assert "LanguageModel" in page.inner_text("#model")
        page.fill("#text", "to")  # an edit that is not an append: the session starts anew
        page.dispatch_event("#text", "input")
        page.wait_for_function(  # the plot is redrawn: it may be absent for a moment
            "document.querySelector('polyline') && "
            "document.querySelector('polyline').getAttribute('points').split(' ').length === 2",
            timeout=20000,
        )
        again = httpx.post(f"{server.url}/v1/predict", json={"input": "to"}).json()
        top = again["outputs"][-1]["top"]
        assert page.locator(".suggestion").all_inner_texts() == [
            f"{visible.get(name, name)} {100 * p:.1f}%" for name, p in top
        ]
    finally:
        server.stop()


def test_typing_shows_running_class_probabilities(classify_run, browser_page):
    server = serve(classify_run)
    try:
        page = browser_page
        page.goto(server.url + "/")
        page.wait_for_selector("#text:not([disabled])", timeout=20000)
        page.type("#text", "cat", delay=20)
        page.wait_for_function(
            "document.querySelectorAll('polyline').length === 3 && "
            "document.querySelector('polyline').getAttribute('points').split(' ').length === 3",
            timeout=20000,
        )
        rows = page.locator(".bar-row").all_inner_texts()
        expected = httpx.post(f"{server.url}/v1/predict", json={"input": "cat"}).json()
        probs = expected["outputs"][-1]["probs"]
        assert [row.split() for row in rows] == [
            [label, f"{100 * p:.1f}%"] for label, p in probs.items()
        ]
    finally:
        server.stop()
