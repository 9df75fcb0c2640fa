"""The loratui Textual app: a step bar (data -> serve) over the run config.

This is the shell that later screens fill in; the App owns the config (and, later, the running job).
"""

from __future__ import annotations

from pathlib import Path

from rich.syntax import Syntax
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import ContentSwitcher, Footer, Header, Static, Tab, Tabs

from loratui.pipeline.config import RunConfig, dump_yaml
from loratui.pipeline.registry import STEP_ORDER

# What each step does and which config sections drive it.
STEP_INFO: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "data": ("Data", "Load, validate and template the training data; split train/validation/test.", ("data",)),
    "train": ("Train", "Train a LoRA, QLoRA or DoRA adapter on the training split.", ("model", "lora", "train")),
    "evaluate": ("Evaluate", "Score the tuned model against the base model on the test split.", ("eval",)),
    "merge": ("Merge", "Fold the adapter into the base weights (merged safetensors).", ("merge",)),
    "export": ("Export", "Write GGUF for llama.cpp and ONNX, each verified in its runtime.", ("export",)),
    "serve": ("Serve", "Run an OpenAI-compatible server on the best format for this hardware.", ("serve",)),
}


class StepPanel(VerticalScroll):
    """One step: what it does and the config that drives it."""

    def __init__(self, step: str, cfg: RunConfig) -> None:
        super().__init__(id=step, classes="step-panel")
        self.step = step
        self.cfg = cfg

    def compose(self) -> ComposeResult:
        title, blurb, sections = STEP_INFO[self.step]
        yield Static(f"[b]{title}[/b]  {blurb}", classes="step-title")
        data = self.cfg.model_dump(mode="json")
        text = dump_yaml({s: data[s] for s in sections})
        yield Static(Syntax(text, "yaml", theme="ansi_dark", background_color="default"), classes="step-config")


class LoratuiApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "loratui"
    BINDINGS = [
        *(Binding(str(i), f"show_step('{step}')", STEP_INFO[step][0], id=f"step-{step}")
          for i, step in enumerate(STEP_ORDER, start=1)),
        Binding("q", "quit", "Quit", id="quit"),
    ]

    def __init__(self, cfg: RunConfig, config_path: str | Path | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.config_path = str(config_path) if config_path else None
        self.sub_title = f"{cfg.name} ({self.config_path or 'default config'})"

    def compose(self) -> ComposeResult:
        yield Header()
        yield Tabs(*(Tab(f"{i} {STEP_INFO[s][0]}", id=f"tab-{s}") for i, s in enumerate(STEP_ORDER, 1)), id="stepbar")
        with ContentSwitcher(initial=STEP_ORDER[0], id="steps"):
            for step in STEP_ORDER:
                yield StepPanel(step, self.cfg)
        yield Footer()

    def on_tabs_tab_activated(self, event: Tabs.TabActivated) -> None:
        if event.tab.id:
            self.query_one("#steps", ContentSwitcher).current = event.tab.id.removeprefix("tab-")

    def action_show_step(self, step: str) -> None:
        self.query_one("#stepbar", Tabs).active = f"tab-{step}"

    @property
    def current_step(self) -> str:
        return self.query_one("#steps", ContentSwitcher).current or STEP_ORDER[0]


def create_app(cfg: RunConfig | None = None, config_path: str | Path | None = None) -> LoratuiApp:
    """The one factory used by the CLI and the tests."""
    return LoratuiApp(cfg or RunConfig(), config_path=config_path)
