"""The App's jobs: run the shown step (``r``, ``R``), start the server, cancel (``c``), quit while they run, and
render their events on timers (the jobs' threads never touch widgets); without a job of its own, the App
follows a step running in another process through ``events.jsonl``. The base class of
:class:`~loratui.tui.app.LoratuiApp`."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from textual import work
from textual.app import App
from textual.screen import Screen
from textual.widgets import ContentSwitcher, ProgressBar, RichLog, Static, Tabs

from loratui.pipeline.config import RunConfig
from loratui.pipeline.registry import STEP_ORDER
from loratui.tui.dialogs import Confirm, ErrorDialog
from loratui.tui.jobs import Job
from loratui.tui.state import REWARD_KEYS, RunState, curves
from loratui.tui.steps import STEP_INFO
from loratui.tui.views import fmt
from loratui.tui.views.serve import ServeView, health
from loratui.tui.views.train import TrainView


def log_line(e: Any) -> str | None:
    """The job log's line for an event (None: the event is shown elsewhere, or not at all)."""
    if e.type == "log" and e.level != "debug":
        return f"{e.level}: {e.message}" if e.level != "info" else e.message
    if e.type == "metric":
        return " ".join(f"{k}={fmt(v)}" for k, v in e.values.items()) + (f" (step {e.at})" if e.at else "")
    if e.type in ("artifact", "checkpoint"):
        return f"{e.type}: {e.path}"
    return None


class JobActions(App[None]):
    """The base of :class:`~loratui.tui.app.LoratuiApp`: its jobs, and the lookups they need."""

    cfg: RunConfig
    state: RunState
    problems: dict[str, str]  # the settings' problems: no job runs while there is one
    grace_s: float
    job: Job | None
    server: Job | None
    server_url: str | None
    _health: dict[str, Any] | None
    _shown: int  # events of the job already rendered
    _reported: bool  # the job's end was shown

    def show_state(self, reload: bool = False) -> None:
        """Render every view and the step bar (re-reading the run directory when ``reload``)."""
        raise NotImplementedError

    def step_argv(self, step: str, extra: list[str] | None = None) -> list[str]:
        """The command line of a step with the current settings."""
        raise NotImplementedError

    @property
    def main(self) -> Screen:
        """The screen of the step views: lookups go there even while a dialog is on top."""
        return self.screen_stack[0]

    def _views_gone(self) -> bool:
        """Shutting down: the screens or their widgets are already gone when a timer fires once more."""
        return not self.screen_stack or not self.main.query("#job-log")

    def action_show_step(self, step: str) -> None:
        self.main.query_one("#stepbar", Tabs).active = f"tab-{step}"

    @property
    def current_step(self) -> str:
        return self.main.query_one("#steps", ContentSwitcher).current or STEP_ORDER[0]

    # ---------------------------------------------------------------------------------- jobs

    def action_run_step(self, extra: list[str] | None = None, step: str | None = None) -> None:
        step = step or self.current_step
        if step == "serve":
            self.start_server()
            return
        if self.job is not None and self.job.running:
            self.notify(f"{self.job.step} is still running: cancel it first (c)", severity="warning")
            return
        if self.problems:
            key, message = next(iter(self.problems.items()))
            self.push_screen(ErrorDialog("Fix the settings first", f"{key}: {message}"))
            return
        if self.state.steps[step] == "blocked":
            self.notify(f"{STEP_INFO[step][0]} {self.state.why_blocked.get(step, 'is blocked')}", severity="warning")
            return
        self._stop_probe("the probe stopped: a job started (it would compete with it)")
        self.job = Job(self.step_argv(step, extra), grace_s=self.grace_s).start()
        self._shown, self._reported = 0, False
        self.main.query_one("#job-log", RichLog).clear()
        self.main.query_one("#job").remove_class("-idle")
        self.main.query_one("#job-progress", ProgressBar).update(total=None, progress=0)
        self.main.query_one("#job-status", Static).update(f"[b]{step}[/b] running (pid {self.job.pid})")
        self.show_state(reload=True)

    def action_resume(self) -> None:
        if self.current_step != "train":
            self.action_show_step("train")
        if not any(self.state.run.checkpoints.glob("checkpoint-*")):
            self.notify("no checkpoint to resume from yet: run training (r) first", severity="warning")
            return
        self.action_run_step(["--resume"], step="train")

    def action_cancel_job(self) -> None:
        if self.current_step == "serve" and self.server is not None and self.server.running:
            self.server.cancel()
            self.notify("stopping the server")
            return
        job = self.job
        if job is None or not job.running:
            if self._stop_probe("the probe was cancelled (c)"):
                self.notify("cancelled the estimate's probe")
            else:
                self.notify("no job is running")
            return

        def answer(yes: bool | None) -> None:
            if yes and job.running:
                job.cancel()
                self.main.query_one("#job-status", Static).update(f"[b]{job.step}[/b] cancelling...")

        self.push_screen(Confirm(f"Cancel {job.step}? It saves what it can (a checkpoint) and stops."), answer)

    def _stop_probe(self, note: str) -> bool:
        """Stop the Train view's probe (a few training steps in a child process); True when one ran."""
        return any([view.estimate.stop(note=note, probe_only=True) for view in self.main.query(TrainView)])

    def start_server(self) -> None:
        if self.server is not None and self.server.running:
            self.notify(f"the server is already running at {self.server_url}", markup=False)
            return
        if self.state.steps["serve"] == "blocked":
            self.notify(f"Serve {self.state.why_blocked.get('serve', 'is blocked')}", severity="warning")
            return
        s = self.cfg.serve
        env = {"LORATUI_API_KEY": s.api_key} if s.api_key else None
        self.server = Job(self.step_argv("serve"), env=env, grace_s=self.grace_s).start()
        self.server_url = f"http://{'127.0.0.1' if s.host in ('0.0.0.0', '::') else s.host}:{s.port}"
        self._health = None

    async def action_quit(self) -> None:
        running = [j for j in (self.job, self.server) if j is not None and j.running]
        if not running:
            self.exit()
            return

        def answer(yes: bool | None) -> None:
            if yes:
                for j in running:
                    j.cancel()
                self.run_worker(self._quit_after(running), exclusive=True, group="quit")

        what = " and ".join(j.step for j in running)
        self.push_screen(Confirm(f"{what} {'is' if len(running) == 1 else 'are'} running. Stop and quit?"), answer)

    def on_unmount(self) -> None:
        """However the app ends (an exception included), no job or server outlives it."""
        for job in (self.job, self.server):
            if job is not None and job.running:
                job.kill()

    async def _quit_after(self, jobs: list[Job]) -> None:
        import asyncio

        while any(j.running for j in jobs):  # SIGTERM, then SIGKILL after the grace period: never an orphan
            await asyncio.sleep(0.05)
        self.exit()

    def refresh_job(self) -> None:
        """Render the job's new events (called on a timer: the job's threads never touch widgets)."""
        if self._views_gone():
            return
        self._refresh_server()
        job = self.job
        if job is None:
            return
        log = self.main.query_one("#job-log", RichLog)
        events = job.events[self._shown :]
        self._shown += len(events)
        for line in map(log_line, events):
            if line is not None:
                log.write(line)
        if job.step == "train" and events:
            found = curves(job.events_so_far())  # a resumed training: with the steps before it
            for view in self.main.query(TrainView):  # when it has been shown
                view.live(found["loss"], found["eval_loss"], {key: found[key] for key in REWARD_KEYS})
        self._render_progress(job.step, job.progress(), job.running, self._speed(job.events))
        if job.running or self._reported:
            return
        self._reported = True
        self.show_state(reload=True)
        self._show_end(job)

    def _show_end(self, job: Job) -> None:
        """How the job ended, in the status line; a failure opens the error dialog."""
        status = self.main.query_one("#job-status", Static)
        if job.state == "done":
            status.update(f"[b]{job.step}[/b] [green]done[/green]")
        elif job.state == "cancelled":
            resume = getattr(job.final_event, "resume_from", None)
            status.update(
                f"[b]{job.step}[/b] [yellow]cancelled[/yellow]"
                + (f"; resume from {escape(resume)} with R" if resume else "")
            )
        else:
            err = job.error
            status.update(f"[b]{job.step}[/b] [red]failed[/red]")
            self.push_screen(
                ErrorDialog(f"{job.step} failed", err.message if err else "the job failed", getattr(err, "hint", None))
            )

    @staticmethod
    def _speed(events: list[Any]) -> str:
        for e in reversed(events[-50:]):
            if e.type == "metric" and "tokens_per_s" in e.values:
                return f", {e.values['tokens_per_s']:.0f} tokens/s"
        return ""

    def _render_progress(self, step: str, progress: Any, running: bool, speed: str = "") -> None:
        bar = self.main.query_one("#job-progress", ProgressBar)
        if progress is not None and progress.total:
            bar.update(total=progress.total, progress=progress.current)
        if running and progress is not None:
            self.main.query_one("#job-status", Static).update(
                f"[b]{escape(step)}[/b] {escape(progress.task)}: {progress.current:g}/{progress.total or '?'} "
                f"{escape(str(progress.unit or ''))}"
                f"{speed} {escape(progress.message or '')}"
            )

    def poll_run(self) -> None:
        """Without a job of our own, follow a step running in another process through events.jsonl."""
        if (self.job is not None and self.job.running) or self._views_gone():
            return
        running = [s for s, st in self.state.steps.items() if st == "running"]
        if not running:
            return
        before = self.state.steps
        self.state = RunState.load(self.cfg)
        if self.state.steps != before:  # a step ended: every view and the step bar change
            self.show_state()
        else:  # only the running step's live parts: the loss and reward curves of a training run
            for view in self.main.query(TrainView):
                view.live(self.state.train_loss, self.state.eval_loss, self.state.rewards)
        if self.state.steps.get(running[0]) != "running":
            self.main.query_one("#job-status", Static).update(f"[b]{running[0]}[/b] ended in another process")
            return
        events = self.state.events  # just read by RunState.load
        progress = next((e for e in reversed(events) if e.type == "progress"), None)
        if progress is not None:
            self._render_progress(
                f"{running[0]} (pid {self.state.last[running[0]].pid}, another process)",
                progress,
                True,
                self._speed(events),
            )

    def _refresh_server(self) -> None:
        server = self.server
        views = self.main.query(ServeView)
        if not views:
            return
        view = views.first(ServeView)
        if server is None:
            view.show_server(None, "stopped", [], None)
            return
        if not server.running:
            tail = list(server.stderr_tail)
            self.server, self.server_url, self._health = None, None, None
            view.show_server(None, server.state, tail, None)
            if server.state == "failed":
                self.push_screen(
                    ErrorDialog(
                        "The server stopped",
                        "\n".join(tail[-6:]) or "no output",
                        "Check the Serve settings (port in use? nothing exported yet?).",
                    )
                )
            return
        view.show_server(self.server_url, "starting", list(server.stderr_tail), self._health)

    def poll_server(self) -> None:
        """Ask the running server's /health twice a second (the view renders the answer on its timer)."""
        if self.server is not None and self.server.running and self.server_url:
            self._poll_health(self.server_url)

    @work(thread=True, exclusive=True, group="health", exit_on_error=False)
    def _poll_health(self, url: str) -> None:
        self._health = health(url)
