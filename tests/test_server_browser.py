"""The web chat page in a real headless browser: Debian's chromium (installed by .ci/run in CI)
driven by Playwright's Python package. Never downloads a browser (no `playwright install`)."""
from __future__ import annotations

import os
import shutil
import threading

import httpx
import pytest

import tinyllm
from tinyllm.server import create_app

from .server_helpers import EvalHook, convert_stories, serving, wait_until

IN_CI = os.environ.get("CI") == "true"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _missing(reason: str):
    if IN_CI:  # CI installs both; a missing browser there is a broken CI, not a skip
        pytest.fail(f"{reason} (CI must run the browser test)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed: pip install -e '.[test]'")
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        _missing("chromium is not installed: apt-get install chromium (.ci/run does this in CI)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def model_path(stories_hf, tmp_path_factory):
    return convert_stories(stories_hf, tmp_path_factory)


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    yield context.new_page()
    context.close()


def load(path):
    return tinyllm.load(path, backend="numpy")


def answer_text(locator) -> str:
    """An answer bubble's text without its note ("stopped", "12 tokens · ...")."""
    return locator.evaluate("el => el.firstChild && el.firstChild.nodeType === 3 ? el.firstChild.textContent : ''")


def test_page_streams_stops_and_holds_a_conversation(page, model_path, tmp_path):
    from playwright.sync_api import expect

    model, reference = load(model_path), load(model_path)
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    with serving(create_app(model)) as server, EvalHook(model, delay=0.02) as hook:  # ~50 tokens/s: visible
        page.goto(server.url + "/")
        expect(page.locator("#model-name")).to_have_text("stories260K")
        expect(page.locator("#model-ctx")).to_have_text("512")
        page.fill("#system", "A story about a dog.")
        page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
        expect(page.locator("#temperature-value")).to_have_text("0.00")
        page.fill("#max-tokens", "400")
        page.fill("#input", "Max the dog")
        page.press("#input", "Enter")

        # streamed text shows up while the model is still generating, and keeps growing
        first = page.locator(".msg.assistant").first
        page.wait_for_function("() => document.querySelector('.msg.assistant').textContent.length > 5")
        shown = len(answer_text(first))
        assert server.worker.stats()["busy"] and page.locator("#stop").is_enabled()
        page.wait_for_function("n => document.querySelector('.msg.assistant').textContent.length > n", arg=shown + 5)

        page.click("#stop")
        expect(page.locator("#status")).to_have_text("Stopped.")
        expect(first.locator(".note")).to_have_text("stopped")
        wait_until(lambda: not server.worker.stats()["busy"], timeout=5)  # Stop frees the model
        assert hook.calls < 200, "generation went on after Stop"
        partial = answer_text(first)
        assert partial and page.locator("#send").is_enabled()

        # a second turn carries the whole conversation, the stopped answer included
        page.fill("#max-tokens", "12")
        page.fill("#input", "Then he")
        page.press("#input", "Enter")
        second = page.locator(".msg.assistant").nth(1)
        expect(second.locator(".note")).to_contain_text("12 tokens", timeout=15000)
        messages = [{"role": "system", "content": "A story about a dog."}, {"role": "user", "content": "Max the dog"},
                    {"role": "assistant", "content": partial}, {"role": "user", "content": "Then he"}]
        assert bodies[1]["messages"] == messages and bodies[1]["temperature"] == 0 and bodies[1]["max_tokens"] == 12
        assert answer_text(second) == reference.chat(messages, max_new_tokens=12, temperature=0)

        assert page.locator("#conversation .msg").count() == 4
        shot = tmp_path / "chat.png"
        page.screenshot(path=shot)
        assert shot.stat().st_size > 10_000
        assert "Max the dog" in page.inner_text("#conversation")


def test_page_says_when_the_server_is_busy(page, model_path):
    from playwright.sync_api import expect

    model = load(model_path)
    with serving(create_app(model, max_queue=0)) as server, EvalHook(model, gated=True) as hook:
        page.goto(server.url + "/")
        expect(page.locator("#model-name")).to_have_text("stories260K")
        other = threading.Thread(target=httpx.post, args=(server.url + "/v1/completions",),
                                 kwargs={"json": {"prompt": "Hi", "max_tokens": 2}, "timeout": 30})
        other.start()
        wait_until(lambda: hook.calls == 1)  # another client holds the model
        page.fill("#input", "Hello")
        page.press("#input", "Enter")
        expect(page.locator("#status")).to_contain_text("The server is busy")
        expect(page.locator("#status")).to_have_class("error")
        assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
        hook.gate.set()
        other.join(10)


def test_page_asks_for_the_api_key(page, model_path):
    from playwright.sync_api import expect

    with serving(create_app(load(model_path), api_key="s3cret")) as server:
        page.goto(server.url + "/")
        expect(page.locator("#status")).to_contain_text("Enter the API key")
        expect(page.locator("#api-key")).to_be_visible()
        page.fill("#api-key", "s3cret")
        page.dispatch_event("#api-key", "change")
        expect(page.locator("#model-name")).to_have_text("stories260K")
        page.fill("#max-tokens", "5")
        page.fill("#input", "Once upon a time")
        page.press("#input", "Enter")
        expect(page.locator(".msg.assistant .note")).to_contain_text("5 tokens")
