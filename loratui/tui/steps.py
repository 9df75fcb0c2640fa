"""The step views in workflow order, and what each step does (for the step bar, the help and the palette)."""

from __future__ import annotations

from loratui.tui.views import StepView
from loratui.tui.views.data import DataView
from loratui.tui.views.eval import EvalView
from loratui.tui.views.export import ExportView
from loratui.tui.views.merge import MergeView
from loratui.tui.views.serve import ServeView
from loratui.tui.views.train import TrainView

VIEWS: tuple[type[StepView], ...] = (DataView, TrainView, EvalView, MergeView, ExportView, ServeView)
# What each step does, for the step bar and the help (one entry per step, in order).
STEP_INFO: dict[str, tuple[str, str, tuple[str, ...]]] = {v.STEP: (v.TITLE, v.BLURB, v.SECTIONS) for v in VIEWS}
