"""Serve: start and stop ``loratui serve`` for this run, see its URL and backend, and chat with it.

The server is a job the App owns (like the steps' jobs, but long-lived). The chat streams from the
server's ``/v1/chat/completions`` in a worker thread, exactly as any OpenAI client would.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.widgets import Input, RichLog, Static

from loratui.tui.screens import StepView
from loratui.tui.state import RunState


def health(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """The server's /health as a dict (also for 503 while loading), None when nothing answers."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read())
        except ValueError:
            return {"status": f"HTTP {e.code}"}
    except (OSError, ValueError):
        return None


def stream_chat(url: str, model: str, messages: list[dict[str, str]], api_key: str | None, max_tokens: int = 256):
    """Yield the text deltas of a streamed chat completion (server-sent events)."""
    body = json.dumps({"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens}).encode()
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


class ServeView(StepView):
    STEP, TITLE, SECTIONS = "serve", "Serve", ("serve",)
    BLURB = "Run an OpenAI-compatible server on the best format for this hardware, and chat with it."
    KEYS = "r start  c stop  Enter in the chat box sends"

    def compose_results(self) -> ComposeResult:
        yield Static("server: stopped (press r to start it)", id="serve-status")
        yield Static("", id="serve-log", classes="serve-log")
        yield RichLog(id="chat-log", wrap=True, markup=True, classes="chat-log")
        yield Static("", id="chat-reply")
        yield Input(placeholder="Ask the served model (Enter sends)", id="chat-input")

    def on_mount(self) -> None:
        self.history: list[dict[str, str]] = []
        self.model_id: str | None = None

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
            status.update(f"server: [b]{escape(str(info.get('status')))}[/b] at [b]{escape(url)}[/b], "
                          f"backend {escape(str(info.get('backend')))}, model {escape(str(self.model_id))}\n"
                          f"[dim]{escape(str(why))}[/dim]")
        self.query_one("#serve-log", Static).update(escape("\n".join(log_tail[-4:])))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "chat-input" or not event.value.strip():
            return
        event.stop()
        url = getattr(self.app, "server_url", None)
        if not url or self.model_id is None:
            self.app.notify("start the server first (r), and wait until it is ready", severity="warning")
            return
        text = event.value.strip()
        event.input.value = ""
        self.history.append({"role": "user", "content": text})
        self.query_one("#chat-log", RichLog).write(f"[b]you[/b] {escape(text)}")
        self.ask(url, self.model_id, list(self.history), self.cfg.serve.api_key)

    @work(thread=True, exclusive=True, group="chat", exit_on_error=False)
    def ask(self, url: str, model: str, messages: list[dict[str, str]], api_key: str | None) -> None:
        parts: list[str] = []
        failed = False
        try:
            for delta in stream_chat(url, model, messages, api_key):
                parts.append(delta)
                self.app.call_from_thread(self.query_one("#chat-reply", Static).update, escape("".join(parts)))
        except (OSError, RuntimeError, ValueError) as e:
            failed = True
            self.app.call_from_thread(self.app.notify, f"chat: {e}", severity="error")
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
