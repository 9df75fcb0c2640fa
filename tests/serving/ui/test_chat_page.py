"""The chat page in a real Chromium (Debian's package, driven by Playwright) against a real `loratui serve`: a tiny
model as the base and a random LoRA adapter on it as the tuned model, behind an API key.

Without a Chromium (or the Playwright wheel) these tests skip and say why; CI installs the browser
(scripts/install-browser.sh) and sets LORATUI_REQUIRE_BROWSER=1, so there they fail instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serving.test_app import _random_adapter
from tests.threaded_server import loratui_serve

KEY = "page-test-key"
SHOTS = os.environ.get("LORATUI_SCREENSHOTS")  # a folder: the compare-mode screenshot goes there too


def chromium() -> str | None:
    """The browser to drive: LORATUI_CHROMIUM, else a Chromium on PATH."""
    given = os.environ.get("LORATUI_CHROMIUM")
    if given:
        return given
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (it is in the dev extra: make setup)"
    if chromium() is None:
        return "no Chromium on PATH: run scripts/install-browser.sh (Debian's chromium package) or set LORATUI_CHROMIUM"
    return None


if _missing():
    if os.environ.get("LORATUI_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"LORATUI_REQUIRE_BROWSER=1 but {_missing()}")
    pytest.skip(_missing() or "", allow_module_level=True)


@pytest.fixture(scope="module")
def served(tiny_model_factory, tmp_path_factory) -> Iterator[str]:
    """`loratui serve` as a user runs it: the tiny model as `base`, a random adapter on it as `tuned`."""
    model = tiny_model_factory(tokenizer="smollm2")  # SmolLM2's tokenizer: a real chat template
    adapter = _random_adapter(model, tmp_path_factory.mktemp("adapter") / "tuned", seed=1)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = [str(model), "--format", "torch", "--model-name", "base", "--adapter", f"tuned={adapter}", "--api-key", KEY]
    with loratui_serve(args, log, cwd=tmp_path_factory.mktemp("cwd")) as url:
        assert "chat page at " + url + "/" in log.read_text()
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, served) -> Iterator[Any]:
    """A fresh tab (its own session storage) that records every request it makes."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=served)
    tab = context.new_page()
    tab.requests = []
    tab.on("request", lambda r: tab.requests.append(r.url))
    # every change to a reply's text, with when it happened: streaming shows up as several changes over time
    tab.add_init_script(
        "window.changes = []; new MutationObserver((records) => { for (const r of records) {"
        " const li = r.target.closest && r.target.closest('.msg.assistant');"
        " if (li) window.changes.push([li.querySelector('.text').textContent.length, performance.now()]); } })"
        ".observe(document, {subtree: true, childList: true, characterData: true});"
    )
    yield tab
    origin = served + "/"
    strays = [u for u in tab.requests if not u.startswith(origin)]
    assert not strays, f"the page loaded from elsewhere: {strays}"
    context.close()


def _unlock(tab: Any, url: str) -> None:
    """Open the page and give the right key when it asks."""
    tab.goto(url + "/")
    tab.locator("#key-dialog[open]").wait_for()
    tab.fill("#key-input", KEY)
    tab.click("#key-save")
    tab.locator("#model-a option").first.wait_for(state="attached")


def _send(tab: Any, text: str) -> None:
    tab.fill("#prompt", text)
    tab.press("#prompt", "Enter")


def _transcript(tab: Any) -> str:
    """What Copy puts on the clipboard: the conversation the page keeps and sends."""
    tab.click("#copy")
    tab.locator("#notice", has_text="Conversation copied").wait_for()
    return str(tab.evaluate("() => navigator.clipboard.readText()"))


def _wait_chunks(reply: Any, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while int(reply.get_attribute("data-chunks") or 0) < at_least and time.monotonic() < deadline:
        time.sleep(0.005)


def _replies(tab: Any, count: int, timeout: float = 120_000) -> list[Any]:
    """The first ``count`` replies, once each is finished (done, stopped or failed)."""
    tab.locator(".msg.assistant[data-state]").nth(count - 1).wait_for(timeout=timeout)
    return tab.locator(".msg.assistant").all()[:count]


def test_the_key_flow_then_an_answer_with_nothing_from_elsewhere(page, served):
    page.goto(served + "/")
    dialog = page.locator("#key-dialog[open]")
    dialog.wait_for()
    page.fill("#key-input", "wrong-key")
    page.click("#key-save")
    page.locator("#key-message", has_text="Incorrect API key").wait_for()  # the server's 401, readable
    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.locator("#model-a option").first.wait_for(state="attached")
    assert not dialog.is_visible()
    assert page.evaluate("() => sessionStorage.getItem('loratui.apiKey')") == KEY
    assert all(KEY not in u for u in page.requests), "the key never goes in a URL"
    assert page.input_value("#model-a") == "tuned"  # alone: the tuned model
    assert page.inner_text("#info-a").startswith("adapter · torch · safetensors")
    page.locator("#health[data-state='ok']").wait_for()
    assert "server ok · torch" in page.inner_text("#health")

    _send(page, "Where is the library?")
    (reply,) = _replies(page, 1)
    assert reply.get_attribute("data-state") == "done", reply.inner_text()
    assert reply.locator(".text").inner_text().strip()
    assert "tokens in" in reply.locator(".meta").inner_text()
    paint = page.evaluate("() => performance.getEntriesByName('first-contentful-paint')[0].startTime")
    print(f"first contentful paint: {paint:.0f} ms")  # the figure in the README comes from bench/chat_page.py

    # an error in OpenAI's shape is shown as a readable message: a model the server does not have
    page.evaluate(
        "() => { const o = document.createElement('option'); o.value = o.textContent = 'nope';"
        " document.querySelector('#model-a').append(o); document.querySelector('#model-a').value = 'nope'; }"
    )
    _send(page, "And the station?")
    failed = _replies(page, 2)[1]
    assert failed.get_attribute("data-state") == "error"
    assert "Error 404: The model `nope` does not exist" in failed.inner_text()
    kept = _transcript(page)  # the unanswered question left the conversation: no two user turns in a row
    assert "Where is the library?" in kept and "And the station?" not in kept
    assert "not kept: no reply" in page.locator(".msg.user").nth(1).inner_text()

    # the key is asked for once per tab: a reload uses it from session storage
    page.reload()
    page.locator("#model-a option").first.wait_for(state="attached")
    assert not page.locator("#key-dialog").is_visible()


def test_cancel_the_key_then_give_it_from_the_header(page, served):
    page.goto(served + "/")
    page.locator("#key-dialog[open]").wait_for()
    page.click("#key-cancel")
    page.locator("#notice", has_text="above to try another").wait_for()
    page.wait_for_timeout(6000)  # a health poll later, it does not ask again on its own
    assert not page.locator("#key-dialog").is_visible()
    page.click("#key-button")
    page.fill("#key-input", KEY)
    page.keyboard.press("Enter")
    page.locator("#model-a option").first.wait_for(state="attached")


def test_a_reply_streams_in_pieces_and_stop_ends_it(page, served):
    _unlock(page, served)
    page.fill("#temperature", "1")
    page.fill("#max-tokens", "450")
    _send(page, "Tell me everything.")
    reply = page.locator(".msg.assistant").first
    reply.wait_for()
    _wait_chunks(reply, 3)
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    page.click("#stop")
    (reply,) = _replies(page, 1)
    assert reply.get_attribute("data-state") == "stopped" and reply.locator(".meta").inner_text() == "stopped"
    assert int(reply.get_attribute("data-chunks")) >= 3
    lengths = [n for n, _ in page.evaluate("() => window.changes")]
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), "the text grew piece by piece"
    assert page.is_enabled("#send") and not page.is_enabled("#stop")

    # Escape stops too, and the conversation goes on with the stopped reply in it
    _send(page, "Go on.")
    second = page.locator(".msg.assistant").nth(1)
    second.wait_for()
    _wait_chunks(second, 1)
    page.keyboard.press("Escape")
    assert _replies(page, 2)[1].get_attribute("data-state") == "stopped"
    stopped = [r.locator(".text").inner_text() for r in _replies(page, 2)]
    kept = _transcript(page)
    assert "User: Tell me everything." in kept and "User: Go on." in kept
    assert all(text.strip()[:20] in kept for text in stopped)

    # Clear in the middle of a reply: the next question starts a conversation of its own
    _send(page, "A third question.")
    third = page.locator(".msg.assistant").nth(2)
    third.wait_for()
    _wait_chunks(third, 1)
    page.click("#clear")
    page.fill("#max-tokens", "4")
    _send(page, "A new start.")
    _replies(page, 1)
    kept = _transcript(page)
    assert kept.count("User:") == 1 and "User: A new start." in kept and "everything" not in kept


def test_compare_mode_streams_base_and_tuned_side_by_side(page, served, tmp_path):
    _unlock(page, served)
    assert page.input_value("#model-a") == "tuned"
    page.check("#compare")
    assert (page.input_value("#model-a"), page.input_value("#model-b")) == ("base", "tuned")
    assert page.inner_text("#info-a").startswith("base · torch")
    assert page.inner_text("#info-b").startswith("adapter · torch")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    _send(page, "What time does the ferry leave?")
    left, right = _replies(page, 2)
    assert left.get_attribute("data-state") == right.get_attribute("data-state") == "done"
    assert left.locator(".who").inner_text() == "base" and right.locator(".who").inner_text() == "tuned"
    assert left.is_visible() and right.is_visible()
    assert left.bounding_box()["x"] < right.bounding_box()["x"], "side by side on a wide screen"
    texts = [r.locator(".text").inner_text() for r in (left, right)]
    assert all(texts) and texts[0] != texts[1], "the adapter changes the model's answer"
    assert min(int(r.get_attribute("data-chunks")) for r in (left, right)) >= 2
    page.screenshot(path=str(tmp_path / "compare.png"))
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / "chat-compare-tiny.png"))

    copied = _transcript(page)
    assert copied.startswith("## base\n\nUser: What time does the ferry leave?") and "## tuned" in copied
    assert "Assistant (base):" in copied and "Assistant (tuned):" in copied
    assert all(text.strip() in copied for text in texts)

    page.click("#clear")
    assert page.locator(".msg").count() == 0


def test_narrow_screens_keyboard_and_reduced_motion(page, served):
    page.set_viewport_size({"width": 360, "height": 740})
    _unlock(page, served)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 360, "no sideways scrolling at 360 px"
    assert not page.is_visible("#settings"), "the settings fold away on a phone"
    for control in ("#prompt", "#send", "#settings-toggle"):
        box = page.locator(control).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360 and box["y"] + box["height"] <= 740, control
    page.click("#settings-toggle")
    assert page.is_visible("#model-a")

    # the keyboard alone: Tab reaches the composer's buttons, Enter in the message box sends
    page.focus("#prompt")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "send"
    page.fill("#max-tokens", "40")
    page.focus("#prompt")
    page.keyboard.type("Hello")
    page.keyboard.press("Enter")
    assert _replies(page, 1)[0].get_attribute("data-state") == "done"
    page.click("#settings-toggle")  # folded again: with a conversation on screen, the composer stays in view
    for text in ("And then?", "Once more?"):
        _send(page, text)
        _replies(page, 1 + ["And then?", "Once more?"].index(text) + 1)
    composer = page.locator("#composer").bounding_box()
    assert composer["y"] + composer["height"] <= 740 and composer["height"] < 200, composer
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 360

    cursor = (
        "() => { const li = document.createElement('li'); li.className = 'msg streaming';"
        " const t = document.createElement('span'); t.className = 'text'; li.append(t); document.body.append(li);"
        " const name = getComputedStyle(t, '::after').animationName; li.remove(); return name; }"
    )
    assert page.evaluate(cursor) == "blink"
    page.emulate_media(reduced_motion="reduce")
    assert page.evaluate(cursor) == "none", "no blinking cursor when the user asks for reduced motion"
