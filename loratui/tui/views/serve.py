"""Serve: start and stop ``loratui serve`` for this run, see its URL and backend, and chat with it.

The server is a job the App owns (like the steps' jobs, but long-lived). The chat streams from the
server's ``/v1/chat/completions`` in a worker thread, exactly as any OpenAI client would. It sends the
temperature of its options (default 0: greedy, to test what was trained) and, by default, each question
alone; "keep history" sends the conversation so far, "New chat" starts a new one.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Button, Checkbox, Input, RichLog, Static

from loratui.serving.healthcheck import ask
from loratui.tui.state import RunState
from loratui.tui.views import StepView


def health(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """The server's /health as a dict (also for 503 while loading), None when nothing answers."""
    status, body = ask(url + "/health", timeout)
    if status is None:
        return None
    try:
        return json.loads(body)  # type: ignore[no-any-return]
    except ValueError:
        return {"status": f"HTTP {status}"} if status >= 300 else None


def chat_body(model: str, messages: list[dict[str, str]], temperature: float, max_tokens: int = 256) -> dict[str, Any]:
    """The JSON body the chat box sends to ``/v1/chat/completions`` (streamed)."""
    return {"model": model, "messages": messages, "temperature": temperature, "stream": True, "max_tokens": max_tokens}


def stream_chat(
    url: str,
    model: str,
    messages: list[dict[str, str]],
    api_key: str | None,
    temperature: float = 0.0,
    max_tokens: int = 256,
):
    """Yield the text deltas of a streamed chat completion (server-sent events)."""
    body = json.dumps(chat_body(model, messages, temperature, max_tokens)).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message", "generation failed"))
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text


def parse_temperature(text: str) -> float | None:
    """The temperature typed in the chat options (0 to 2, as the server accepts), None when it is not one."""
    try:
        value = float(text.strip() or "0")
    except ValueError:
        return None
    return value if 0.0 <= value <= 2.0 else None


class ServeView(StepView):
    STEP, TITLE, SECTIONS = "serve", "Serve", ("serve",)
    BLURB = "Run an OpenAI-compatible server on the best format for this hardware, and chat with it."
    KEYS = "r start  c stop  Enter in the chat box sends"

    def compose_results(self) -> ComposeResult:
        yield Static("server: stopped (press r to start it)", id="serve-status")
        yield Static("", id="serve-log", classes="serve-log")
        yield RichLog(id="chat-log", wrap=True, markup=True, classes="chat-log")
        yield Static("", id="chat-reply")
        with Horizontal(id="chat-options"):
            yield Static("temperature", classes="chat-option-label")
            yield Input(
                "0",
                id="chat-temperature",
                compact=True,
                select_on_focus=False,
                tooltip="0: greedy, the model's most likely answer (test what was trained); up to 2: more varied",
            )
            yield Checkbox(
                "keep history",
                False,
                id="chat-keep-history",
                compact=True,
                tooltip="send the conversation so far with each question (off: each question alone)",
            )
            yield Button("New chat", id="chat-new", compact=True, tooltip="clear the conversation")
        yield Static("", id="chat-mode", classes="chat-mode")
        yield Input(placeholder="Ask the served model (Enter sends)", id="chat-input", select_on_focus=False)

    def on_mount(self) -> None:
        self.history: list[dict[str, str]] = []  # the conversation shown since the last "New chat"
        self.model_id: str | None = None
        self._show_mode()

    @property
    def keep_history(self) -> bool:
        return self.query_one("#chat-keep-history", Checkbox).value

    def _show_mode(self) -> None:
        """Say what the next question is sent with (under the chat options)."""
        temperature = parse_temperature(self.query_one("#chat-temperature", Input).value)
        if temperature is None:
            text = "[red]temperature: a number from 0 to 2[/red]"
        else:
            text = (
                f"[dim]sends {'the conversation so far' if self.keep_history else 'each question alone'}, "
                f"temperature {temperature:g}{' (greedy)' if temperature == 0 else ''}[/dim]"
            )
        self.query_one("#chat-mode", Static).update(text)

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "chat-temperature":
            event.stop()
            event.input.set_class(parse_temperature(event.value) is None, "-invalid")
            self._show_mode()

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        if event.checkbox.id == "chat-keep-history":
            event.stop()
            self._show_mode()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "chat-new":
            event.stop()
            self.new_chat()

    def new_chat(self) -> None:
        """Forget the conversation (the log too): the next question starts a new one."""
        self.history.clear()
        self.query_one("#chat-log", RichLog).clear()
        self.query_one("#chat-input", Input).focus()

    def show_server(self, url: str | None, state: str, log_tail: list[str], info: dict[str, Any] | None) -> None:
        """Called by the App's timer with the server job's state and its last /health answer."""
        found = self.query("#serve-status")
        if not found:  # not composed yet
            return
        status = found.first(Static)
        if url is None:
            status.update("server: stopped (press r to start it)")
        elif info is None:
            status.update(f"server: {state}; waiting for {escape(url)} ...")
        else:
            self.model_id = info.get("model") or self.model_id
            why = info.get("reason") or info.get("serving") or ""
            status.update(
                f"server: [b]{escape(str(info.get('status')))}[/b] at [b]{escape(url)}[/b], "
                f"backend {escape(str(info.get('backend')))}, model {escape(str(self.model_id))}\n"
                f"[dim]{escape(str(why))}[/dim]"
            )
        self.query_one("#serve-log", Static).update(escape("\n".join(log_tail[-4:])))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "chat-input" or not event.value.strip():
            return
        event.stop()
        url = getattr(self.app, "server_url", None)
        if not url or self.model_id is None:
            self.app.notify("start the server first (r), and wait until it is ready", severity="warning")
            return
        temperature = parse_temperature(self.query_one("#chat-temperature", Input).value)
        if temperature is None:
            self.app.notify("the temperature is a number from 0 to 2", severity="warning")
            return
        text = event.value.strip()
        event.input.value = ""
        question = {"role": "user", "content": text}
        messages = [*self.history, question] if self.keep_history else [question]
        self.history.append(question)
        self.query_one("#chat-log", RichLog).write(f"[b]you[/b] {escape(text)}")
        self.ask(url, self.model_id, messages, self.cfg.serve.api_key, temperature)

    @work(thread=True, exclusive=True, group="chat", exit_on_error=False)
    def ask(
        self, url: str, model: str, messages: list[dict[str, str]], api_key: str | None, temperature: float = 0.0
    ) -> None:
        parts: list[str] = []
        failed = False
        try:
            for delta in stream_chat(url, model, messages, api_key, temperature):
                parts.append(delta)
                self.app.call_from_thread(self.query_one("#chat-reply", Static).update, escape("".join(parts)))
        except (OSError, RuntimeError, ValueError) as e:
            failed = True
            self.app.call_from_thread(self.app.notify, f"chat: {e}", severity="error", markup=False)
        reply = "".join(parts)

        def done() -> None:
            self.query_one("#chat-reply", Static).update("")
            if failed:  # the question is taken back, so the next one does not follow an unanswered turn
                if self.history and self.history[-1]["role"] == "user":
                    self.history.pop()
                self.query_one("#chat-log", RichLog).write("[dim](no answer: the request failed)[/dim]")
                return
            self.history.append({"role": "assistant", "content": reply})
            self.query_one("#chat-log", RichLog).write(f"[b]model[/b] {escape(reply)}")

        self.app.call_from_thread(done)

    def show_results(self, state: RunState) -> None:
        self.cfg = state.cfg
