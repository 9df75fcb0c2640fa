"""Settings forms generated from the config schema (:class:`~loratui.pipeline.config.RunConfig`).

Each field becomes a row: its name, an editor chosen from its type (a switch for booleans, a select for
one of a few values, a selection list for a list of a few values, a text input for everything else,
read as YAML exactly like a command-line override ``train.lr=1e-4``), its description as help and a
line for its validation message. An edit posts :class:`FieldEdited`; the App re-validates the whole
config through :func:`~loratui.pipeline.config.load_config` and answers with :meth:`ConfigForm.show_problems`,
so the form, the CLI and the config file share one validator. F1 on a field opens its full help.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from rich.markup import escape
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Input, Select, SelectionList, Static, Switch

from loratui.pipeline.config import RunConfig, describe_type

# Fields at the top of the config (not in a section) and the step that shows them.
TOP_LEVEL = ("name", "runs_dir")
LABEL_WIDTH = 18  # the names column of a form (app.tcss .field-label): a longer name gets a line of its own


@dataclass(frozen=True)
class FieldSpec:
    key: str  # dotted: "train.lr"
    annotation: Any
    description: str
    kind: Literal["switch", "select", "multi", "text"]
    choices: tuple[str, ...] = ()
    nullable: bool = False

    @property
    def type_text(self) -> str:
        return describe_type(self.annotation, markdown=False)

    @property
    def name(self) -> str:
        """The label of its row: the last part of the dotted key."""
        return self.key.split(".")[-1]

    @property
    def widget_id(self) -> str:
        return "f-" + self.key.replace(".", "--")


def _literal_values(annotation: Any) -> tuple[str, ...] | None:
    if typing.get_origin(annotation) is Literal:
        return tuple(str(v) for v in typing.get_args(annotation))
    return None


def field_spec(key: str, info: Any) -> FieldSpec:
    ann = info.annotation
    args = typing.get_args(ann)
    nullable = type(None) in args
    choices = _literal_values(ann)
    if ann is bool:
        return FieldSpec(key, ann, info.description or "", "switch")
    if choices:
        return FieldSpec(key, ann, info.description or "", "select", choices)
    if typing.get_origin(ann) is list and args and (inner := _literal_values(args[0])):
        return FieldSpec(key, ann, info.description or "", "multi", inner)
    return FieldSpec(key, ann, info.description or "", "text", nullable=nullable)


def section_fields(section: str) -> list[FieldSpec]:
    """The fields of one config section (or ``run``: the top-level name and runs folder), in schema order."""
    if section == "run":
        return [field_spec(k, RunConfig.model_fields[k]) for k in TOP_LEVEL]
    model: type[BaseModel] = RunConfig.model_fields[section].annotation  # type: ignore[assignment]
    return [field_spec(f"{section}.{k}", info) for k, info in model.model_fields.items()]


def value_of(cfg: RunConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node.model_dump(mode="json", exclude_defaults=True) if isinstance(node, BaseModel) else node


def as_text(value: Any) -> str:
    """A value as the text of an override (``null`` shows as empty)."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


def same_value(text: str, value: Any) -> bool:
    """True when override text means ``value`` (so the field is not an edit)."""
    try:
        parsed = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return False
    return parsed == value or (isinstance(value, str) and str(parsed) == value)


def override_text(spec: FieldSpec, raw: str) -> str:
    """What the text typed into a field means as the right side of ``key=...``."""
    if spec.nullable and not raw.strip():
        return "null"
    return raw


class FieldEdited(Message):
    """A field changed; ``value`` is the right side of the override ``key=value``."""

    def __init__(self, key: str, value: str) -> None:
        super().__init__()
        self.key, self.value = key, value


class FieldRow(Vertical):
    """One setting: label and editor on a line, then the validation message (hidden when valid). A name
    too long for the names column (and a space after it) goes on a line of its own above the editor,
    so it never runs into the value."""

    def __init__(self, spec: FieldSpec, value: Any) -> None:
        super().__init__(classes="field-row")
        self.spec, self.value = spec, value
        self.help_text = (
            f"[b]{escape(spec.key)}[/b]  ({escape(spec.type_text)})\n\n{escape(spec.description)}"
            + (f"\n\nOne of: {', '.join(spec.choices)}" if spec.choices else "")
            + (
                "\n\nTyped as YAML, like a command-line override: `[a, b]` for a list, "
                "`{k: v}` for a mapping, empty for none."
                if spec.kind == "text"
                else ""
            )
        )

    def compose(self) -> ComposeResult:
        spec, value = self.spec, self.value
        long_name = len(spec.name) >= LABEL_WIDTH
        if long_name:
            yield Static(spec.name, classes="field-label -long", markup=False)
        with Horizontal(classes="field-line"):
            yield Static("" if long_name else spec.name, classes="field-label", markup=False)
            if spec.kind == "switch":
                yield Switch(bool(value), id=spec.widget_id)
            elif spec.kind == "select":
                yield Select(
                    [(c, c) for c in spec.choices], value=str(value), allow_blank=False, id=spec.widget_id, compact=True
                )
            elif spec.kind == "multi":
                chosen = {str(v) for v in value or []}
                yield SelectionList(*((c, c, c in chosen) for c in spec.choices), id=spec.widget_id, compact=True)
            else:
                yield Input(
                    as_text(value), placeholder=spec.type_text, id=spec.widget_id, compact=True, select_on_focus=False
                )  # typing after Tab adds at the end instead of replacing it all
        yield Static(escape(spec.description), classes="field-help")
        yield Static("", classes="field-error")

    def editor(self) -> Widget:
        return self.query_one(f"#{self.spec.widget_id}")

    def show_problem(self, message: str | None) -> None:
        err = self.query_one(".field-error", Static)
        err.update(escape(message or ""))
        err.display = bool(message)
        self.set_class(bool(message), "-invalid")


class ConfigForm(Vertical):
    """The settings of some config sections, generated from the schema."""

    def __init__(self, sections: tuple[str, ...], cfg: RunConfig, **kwargs: Any) -> None:
        super().__init__(classes="config-form", **kwargs)
        self.sections, self.cfg = sections, cfg
        self.specs = {s.key: s for section in sections for s in section_fields(section)}

    def compose(self) -> ComposeResult:
        for section in self.sections:
            yield Static(f"[b]{section}[/b]", classes="form-section")
            for spec in section_fields(section):
                yield FieldRow(spec, value_of(self.cfg, spec.key))

    def on_mount(self) -> None:
        for row in self.query(FieldRow):
            row.show_problem(None)

    def _spec(self, widget: Widget) -> FieldSpec | None:
        return self.specs.get((widget.id or "").removeprefix("f-").replace("--", "."))

    def _post(self, widget: Widget, value: str) -> None:
        if (spec := self._spec(widget)) is not None:
            self.post_message(FieldEdited(spec.key, value))

    @on(Input.Changed)
    def _input(self, event: Input.Changed) -> None:
        event.stop()
        if (spec := self._spec(event.input)) is not None:
            self._post(event.input, override_text(spec, event.value))

    @on(Switch.Changed)
    def _switch(self, event: Switch.Changed) -> None:
        event.stop()
        self._post(event.switch, "true" if event.value else "false")

    @on(Select.Changed)
    def _select(self, event: Select.Changed) -> None:
        event.stop()
        if event.value is not Select.BLANK:
            self._post(event.select, str(event.value))

    @on(SelectionList.SelectedChanged)
    def _multi(self, event: SelectionList.SelectedChanged) -> None:
        event.stop()
        self._post(event.selection_list, as_text(list(event.selection_list.selected)) or "[]")

    def show_problems(self, problems: dict[str, str]) -> None:
        """Validation messages by dotted key; every other field is shown as valid."""
        for row in self.query(FieldRow):
            row.show_problem(problems.get(row.spec.key))

    def row_for(self, widget: Widget | None) -> FieldRow | None:
        """The row holding ``widget`` (for F1 help on the focused editor)."""
        node = widget
        while node is not None and node is not self:
            if isinstance(node, FieldRow):
                return node
            node = node.parent  # type: ignore[assignment]
        return None
