"""The TUI's modal dialogs: confirm, error, text (help, command line), open a run, save as, pick a file."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, OptionList, Static
from textual.widgets.option_list import Option


class Confirm(ModalScreen[bool]):
    """A yes/no question; Enter or y says yes, Escape or n says no."""

    BINDINGS = [
        Binding("y,enter", "answer(True)", "Yes", id="confirm-yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm-no"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__(classes="dialog")
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box"):
            yield Static(self.question, classes="dialog-text", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Yes (y)", id="yes", variant="warning")
                yield Button("No (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ErrorDialog(ModalScreen[None]):
    """The one place errors are shown: the message and what to do, never a traceback."""

    BINDINGS = [Binding("escape,enter,q", "dismiss", "Close", id="error-close")]

    def __init__(self, title: str, message: str, hint: str | None = None) -> None:
        super().__init__(classes="dialog")
        self.title_text, self.message, self.hint = title, message, hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box error-box"):
            yield Static(f"[b]{escape(self.title_text)}[/b]", classes="dialog-title")
            yield Static(escape(self.message), id="error-message", classes="dialog-text")
            if self.hint:
                yield Static(escape(self.hint), id="error-hint", classes="dialog-hint")
            yield Button("Close (Esc)", id="close")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss()


class TextDialog(ModalScreen[None]):
    """Help for a field, the equivalent command line ...: markup text and a close key."""

    BINDINGS = [Binding("escape,enter,q,f1", "dismiss", "Close", id="text-close")]

    def __init__(self, title: str, body: str, markup: bool = True) -> None:
        super().__init__(classes="dialog")
        self.title_text, self.body, self.markup = title, body, markup

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box wide-box"):
            yield Static(f"[b]{escape(self.title_text)}[/b]", classes="dialog-title")
            with VerticalScroll(classes="dialog-scroll"):
                yield Static(self.body if self.markup else escape(self.body), id="dialog-body", classes="dialog-text")
            yield Button("Close (Esc)", id="close")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss()


class OpenDialog(ModalScreen[str | None]):
    """Open a run: type a run folder or config file, or pick a recent one."""

    BINDINGS = [Binding("escape", "dismiss", "Close", id="open-close")]

    def __init__(self, recent: list[str]) -> None:
        super().__init__(classes="dialog")
        self.recent = recent

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box wide-box"):
            yield Static("[b]Open a run[/b]: a run folder or a config file", classes="dialog-title")
            yield Input(placeholder="runs/my-run  or  my-run.yaml", id="open-path", select_on_focus=False)
            yield Static("Recent" if self.recent else "No recent runs yet.", classes="dialog-hint")
            if self.recent:
                yield OptionList(*(Option(Text(p), id=p) for p in self.recent), id="open-recent")  # paths, not markup

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.dismiss(event.value.strip())

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class SaveAsDialog(ModalScreen[str | None]):
    """Save the settings as another config file: type its path (Enter saves, Escape cancels)."""

    BINDINGS = [Binding("escape", "dismiss", "Close", id="save-as-close")]

    def __init__(self, suggestion: str, current: str | None) -> None:
        super().__init__(classes="dialog")
        self.suggestion, self.current = suggestion, current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box wide-box"):
            yield Static("[b]Save settings as[/b]: a config file (Enter saves, Esc cancels)", classes="dialog-title")
            yield Input(self.suggestion, placeholder="my-run.yaml", id="save-as-path", select_on_focus=False)
            yield Static(
                f"Now editing: {self.current}" if self.current else "Now editing: no config file yet",
                classes="dialog-hint",
                markup=False,
            )

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.dismiss(event.value.strip())


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".md")


class DataFiles(DirectoryTree):
    """Folders, and the files the data step reads (hidden entries left out)."""

    def filter_paths(self, paths: Any) -> Any:
        return [p for p in paths if not p.name.startswith(".") and (p.is_dir() or p.suffix.lower() in DATA_SUFFIXES)]


class FilePicker(ModalScreen[str | None]):
    """Pick a data file (or a folder of documents) from the working folder down."""

    BINDINGS = [
        Binding("escape", "dismiss", "Close", id="pick-close"),
        Binding("space", "pick_folder", "Use this folder", id="pick-folder"),
    ]

    def __init__(self, root: str = ".") -> None:
        super().__init__(classes="dialog")
        self.root = root

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box wide-box"):
            yield Static(
                "[b]Training data[/b]: Enter picks a file, Space a folder of .txt/.md documents", classes="dialog-title"
            )
            yield DataFiles(self.root, id="pick-tree")

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(str(event.path))

    def action_pick_folder(self) -> None:
        node = self.query_one(DataFiles).cursor_node
        if node is not None and node.data is not None and node.data.path.is_dir():
            self.dismiss(str(node.data.path))
