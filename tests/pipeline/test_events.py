"""Run events: the sink helpers, the JSONL wire format and the human (rich) view."""

from __future__ import annotations

import io
import json

import pytest

from loratui.pipeline.events import (
    EVENT_TYPES,
    FINAL_TYPES,
    Artifact,
    Cancelled,
    Checkpoint,
    Done,
    Error,
    EventSink,
    JsonlWriter,
    Log,
    MemoryWriter,
    Metric,
    Progress,
    RichWriter,
    null_sink,
    parse_event,
    read_events,
)


def _emit_all(sink: EventSink, tmp_path) -> None:
    artifact_file = tmp_path / "adapter.safetensors"
    artifact_file.write_bytes(b"x" * 123)
    sink.progress(3, 10, task="tokenize", unit="rows", message="tokenizing")
    sink.progress(0.5)
    sink.metric({"loss": 1.25, "eval_loss": 2.5}, at=7, split="validation")
    sink.log("hello")
    sink.log("careful", level="warning")
    sink.artifact(artifact_file, "adapter")
    sink.artifact(tmp_path, "merged")
    sink.checkpoint(tmp_path / "checkpoints" / "step-7", at=7)
    sink.done({"train_loss": 0.5, "steps": 7}, seconds=1.5)
    sink.error("bad input", hint="fix it", user_error=True)
    sink.error("boom", user_error=False)
    sink.cancelled(resume_from="ck/7")
    sink.cancelled()


# (helper call, expected class, expected fields)
HELPERS = [
    (
        lambda s: s.progress(3, 10, task="t", unit="rows", message="m"),
        Progress,
        {"current": 3, "total": 10, "task": "t", "unit": "rows", "message": "m"},
    ),
    (lambda s: s.progress(1), Progress, {"current": 1, "total": None, "task": "main", "unit": "it"}),
    (
        lambda s: s.metric({"loss": 0.5}, at=3, split="train"),
        Metric,
        {"values": {"loss": 0.5}, "at": 3, "split": "train"},
    ),
    (lambda s: s.log("hi", level="warning"), Log, {"message": "hi", "level": "warning"}),
    (lambda s: s.log("hi"), Log, {"message": "hi", "level": "info"}),
    (
        lambda s: s.artifact("does/not/exist.gguf", "gguf"),
        Artifact,
        {"path": "does/not/exist.gguf", "kind": "gguf", "bytes": None},
    ),
    (lambda s: s.checkpoint("ck/1", at=1), Checkpoint, {"path": "ck/1", "at": 1}),
    (lambda s: s.done({"a": 1}, seconds=2.0), Done, {"summary": {"a": 1}, "seconds": 2.0}),
    (lambda s: s.done(), Done, {"summary": {}, "seconds": None}),
    (lambda s: s.error("bad", hint="h", user_error=False), Error, {"message": "bad", "hint": "h", "user_error": False}),
    (lambda s: s.error("bad"), Error, {"message": "bad", "hint": None, "user_error": True}),
    (lambda s: s.cancelled(resume_from="ck/2"), Cancelled, {"message": "cancelled", "resume_from": "ck/2"}),
]


@pytest.mark.parametrize("call,cls,fields", HELPERS)
def test_helpers_emit_the_right_event(call, cls, fields):
    sink = null_sink("train")
    mem = sink.writers[0]
    assert isinstance(mem, MemoryWriter)
    returned = call(sink)
    assert len(mem) == 1
    event = mem[0]
    assert event is returned
    assert type(event) is cls
    assert event.type == cls.model_fields["type"].default
    assert event.type in EVENT_TYPES
    assert event.step == "train"
    assert isinstance(event.t, float) and event.t > 1_600_000_000
    for key, value in fields.items():
        assert getattr(event, key) == value, key


def test_artifact_records_file_size(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"0123456789")
    sink = null_sink("export")
    assert sink.artifact(f, "gguf").bytes == 10
    assert sink.artifact(tmp_path, "folder").bytes is None


def test_sink_fans_out_to_every_writer_and_closes_them(tmp_path):
    a, b = MemoryWriter(), MemoryWriter()
    path = tmp_path / "sub" / "events.jsonl"
    jsonl = JsonlWriter(path)
    sink = EventSink("data", [a, jsonl, b])
    sink.log("one")
    sink.metric({"rows": 3})
    sink.close()
    assert [e.type for e in a] == ["log", "metric"]
    assert list(a) == list(b)
    assert a.of_type("metric")[0].values == {"rows": 3}
    assert jsonl._fh.closed
    assert [e.type for e in read_events(path)] == ["log", "metric"]


def test_every_event_round_trips_through_jsonl(tmp_path):
    path = tmp_path / "run" / "events.jsonl"
    writer = JsonlWriter(path)
    mem = MemoryWriter()
    sink = EventSink("train", [writer, mem])
    _emit_all(sink, tmp_path)
    sink.close()

    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(mem) == 13
    assert {e.type for e in mem} == set(EVENT_TYPES)
    for line in lines:
        assert isinstance(json.loads(line), dict)

    back = read_events(path)
    assert len(back) == len(mem)
    for original, parsed in zip(mem, back):
        assert type(parsed) is type(original)
        assert parsed.model_dump() == original.model_dump()
    # each line also parses on its own, from str, bytes and dict
    for line, original in zip(lines, mem):
        assert parse_event(line).model_dump() == original.model_dump()
        assert parse_event(line.encode()).model_dump() == original.model_dump()
        assert parse_event(json.loads(line)).model_dump() == original.model_dump()


def test_jsonl_writer_omits_none_and_appends(tmp_path):
    path = tmp_path / "events.jsonl"
    w1 = JsonlWriter(path)
    EventSink("x", [w1]).progress(1)
    w1.close()
    w2 = JsonlWriter(path)
    EventSink("x", [w2]).log("second")
    w2.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["type"] == "progress" and first["step"] == "x"
    assert "total" not in first and "message" not in first
    assert json.loads(lines[1])["message"] == "second"


def test_jsonl_writer_on_a_stream_does_not_close_it():
    stream = io.StringIO()
    writer = JsonlWriter(stream)
    EventSink("serve", [writer]).log("listening")
    writer.close()
    assert not stream.closed
    (line,) = stream.getvalue().splitlines()
    event = parse_event(line)
    assert isinstance(event, Log) and event.message == "listening" and event.step == "serve"


def test_read_events_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = JsonlWriter(path)
    sink = EventSink("train", [writer])
    sink.progress(1, 10)
    sink.metric({"loss": 1.0})
    writer.close()
    whole = Checkpoint(step="train", path="ck/1").model_dump_json()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(whole[: len(whole) // 2])  # a writer killed mid-line
    events = read_events(path)
    assert [e.type for e in events] == ["progress", "metric"]


def test_read_events_skips_blank_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("\n" + Log(step="a", message="m").model_dump_json() + "\n\n")
    (event,) = read_events(path)
    assert event.message == "m"


def test_parse_event_rejects_unknown_type():
    with pytest.raises(ValueError):
        parse_event('{"t": 1.0, "step": "train", "type": "explosion"}')
    with pytest.raises(ValueError):
        parse_event({"t": 1.0, "step": "train", "type": "explosion"})


def test_parse_event_rejects_missing_fields_and_bad_json():
    with pytest.raises(ValueError):
        parse_event('{"t": 1.0, "step": "train", "type": "log"}')  # no message
    with pytest.raises(ValueError):
        parse_event('{"t": 1.0, "step": "train"}')  # no type
    with pytest.raises(ValueError):
        parse_event('{"t": 1.0, "step": "tr')


def test_parse_event_keeps_unknown_fields_from_newer_producers():
    event = parse_event('{"t": 1.0, "step": "train", "type": "log", "message": "m", "gpu": "h100"}')
    assert isinstance(event, Log)
    assert event.model_extra == {"gpu": "h100"}
    assert json.loads(event.model_dump_json())["gpu"] == "h100"


def test_final_types_are_event_types():
    assert FINAL_TYPES == {"done", "error", "cancelled"}
    assert FINAL_TYPES <= set(EVENT_TYPES)


# --------------------------------------------------------------------------------------------
# RichWriter
# --------------------------------------------------------------------------------------------


def test_rich_writer_renders_progress_metric_log_done():
    stream = io.StringIO()
    writer = RichWriter(stream)
    sink = EventSink("train", [writer])
    sink.progress(1, 10, message="warming up")
    sink.progress(5, 10)
    sink.progress(2, None, task="tokenize")
    sink.metric({"eval_loss": 1.23456}, at=5, split="validation")
    sink.log("hello from the trainer")
    sink.log("invisible debug line", level="debug")
    sink.log("watch out", level="warning")
    sink.checkpoint("ck/step-5", at=5)
    sink.done({"loss": 1.0}, seconds=2.5)
    text = stream.getvalue()
    assert "eval_loss=1.235" in text
    assert "train step 5" in text
    assert "hello from the trainer" in text
    assert "watch out" in text
    assert "invisible debug line" not in text
    assert "checkpoint ck/step-5" in text
    assert "5/10" in text  # the bar
    assert "train: tokenize" in text
    assert "train done in 2.5s" in text
    assert writer._progress is None  # the final event stopped the bars


def test_rich_writer_renders_cancelled_with_resume_point():
    stream = io.StringIO()
    sink = EventSink("merge", [RichWriter(stream)])
    sink.progress(1, 2)
    sink.cancelled(resume_from="ck/9")
    assert "merge cancelled (resume from ck/9)" in stream.getvalue()


def test_rich_writer_prints_errors_with_their_hint():
    stream = io.StringIO()
    sink = EventSink("data", [RichWriter(stream)])
    sink.progress(1, 4)
    sink.error("the file [train.jsonl] is empty", hint="point data.source at a file with rows")
    text = stream.getvalue()
    assert "error: the file [train.jsonl] is empty" in text
    assert "hint: point data.source at a file with rows" in text
    assert text.count("the file [train.jsonl] is empty") == 1


def test_rich_writer_prints_brackets_literally():
    stream = io.StringIO()
    sink = EventSink("train", [RichWriter(stream)])
    sink.log("targets [q_proj, v_proj]")
    sink.artifact("runs/[x]/adapter", "adapter")
    sink.log("a closing tag [/b] in a message")  # would raise MarkupError if taken as markup
    text = stream.getvalue()
    assert "targets [q_proj, v_proj]" in text
    assert "runs/[x]/adapter" in text
    assert "a closing tag [/b] in a message" in text


def test_rich_writer_shows_the_metric_split():
    stream = io.StringIO()
    EventSink("train", [RichWriter(stream)]).metric({"eval_loss": 1.0}, at=5, split="validation")
    assert "validation" in stream.getvalue()


def test_rich_writer_metric_names_with_brackets():
    stream = io.StringIO()
    sink = EventSink("evaluate", [RichWriter(stream)])
    sink.metric({"acc[/test]": 0.5, "f1[macro]": 0.25})
    text = stream.getvalue()
    assert "acc[/test]=0.5" in text
    assert "f1[macro]=0.25" in text
