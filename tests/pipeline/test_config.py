"""The run config schema: defaults, descriptions, overrides, error messages, YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loratui.pipeline.config import (
    SECTIONS,
    ConfigError,
    ConfigProblem,
    RunConfig,
    config_reference_markdown,
    load_config,
)

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def _all_dotted_fields() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for name, info in RunConfig.model_fields.items():
        out.append((name, info))
        if name in SECTIONS:
            for sub, sub_info in info.annotation.model_fields.items():
                out.append((f"{name}.{sub}", sub_info))
    return out


ALL_FIELDS = _all_dotted_fields()


def _problems(path=None, overrides=None) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as exc_info:
        load_config(path, overrides)
    problems = exc_info.value.problems
    assert problems, "a ConfigError must carry at least one problem"
    assert all(isinstance(p, ConfigProblem) for p in problems)
    return problems


# --------------------------------------------------------------------------------------------
# Defaults and schema
# --------------------------------------------------------------------------------------------


def test_defaults_load():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.name == "quickstart"
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.lora.r == 16
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.data.max_length == "auto"
    assert cfg.run_dir == Path("runs") / "quickstart"


def test_every_section_is_a_model_field():
    assert set(SECTIONS) <= set(RunConfig.model_fields)
    for section in SECTIONS:
        assert RunConfig.model_fields[section].annotation.model_fields, section


def test_schema_has_many_fields():
    # guards the parametrized description test below against silently iterating nothing
    names = {name for name, _ in ALL_FIELDS}
    assert {"name", "runs_dir", "train.lr", "lora.r", "data.max_length", "serve.port"} <= names
    assert len(ALL_FIELDS) > 60


@pytest.mark.parametrize("dotted,info", ALL_FIELDS, ids=[name for name, _ in ALL_FIELDS])
def test_every_field_has_a_description(dotted, info):
    assert isinstance(info.description, str), dotted
    assert info.description.strip(), f"{dotted} has an empty description"


def test_quickstart_example_validates():
    cfg = load_config(QUICKSTART)
    raw = yaml.safe_load(QUICKSTART.read_text())
    assert cfg.name == raw["name"] == "quickstart"
    assert cfg.model.base == raw["model"]["base"]
    assert cfg.export.gguf_quants == ["q8_0"]
    assert "contains" in cfg.eval.metrics and "rougeL" in cfg.eval.metrics
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.epochs == 20 and cfg.train.keep_best is False


def test_empty_file_gives_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing here\n")
    assert load_config(f) == RunConfig()


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def test_overrides_apply_with_the_right_types():
    cfg = load_config(
        None,
        ["train.lr=1e-4", "lora.r=32", "lora.target_modules=[q_proj,v_proj]", "data.max_length=auto"],
    )
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(1e-4)
    assert type(cfg.lora.r) is int and cfg.lora.r == 32
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.max_length == "auto"


def test_override_int_for_auto_field_and_bool():
    cfg = load_config(None, ["data.max_length=512", "train.padding_free=false", "lora.alpha=64"])
    assert type(cfg.data.max_length) is int and cfg.data.max_length == 512
    assert cfg.train.padding_free is False
    assert cfg.lora.alpha == 64


def test_overrides_win_over_the_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  lr: fast\nlora:\n  r: 8\n")
    # the file's bad value is replaced by the override before validation
    cfg = load_config(f, ["train.lr=0.01"])
    assert cfg.train.lr == pytest.approx(0.01)
    assert cfg.lora.r == 8


def test_override_error_names_the_override_not_the_file():
    problems = _problems(QUICKSTART, ["train.lr=abc"])
    assert len(problems) == 1
    p = problems[0]
    assert p.source == "override 'train.lr=abc'"
    assert p.field == "train.lr"
    assert p.line is None
    assert "quickstart.yaml" not in str(p)
    assert "'abc'" in p.message
    assert "number" in p.message


def test_file_and_override_errors_keep_their_own_sources(tmp_path):
    f = tmp_path / "mixed.yaml"
    f.write_text("lora:\n  method: lorax\n")
    problems = {p.field: p for p in _problems(f, ["train.lr=abc"])}
    assert set(problems) == {"lora.method", "train.lr"}
    assert problems["lora.method"].source == str(f)
    assert problems["lora.method"].line == 2
    assert problems["train.lr"].source == "override 'train.lr=abc'"
    assert problems["train.lr"].line is None


@pytest.mark.parametrize("bad", ["train.lr", "=1", "train..lr=1", ".lr=1"])
def test_bad_override_string(bad):
    problems = _problems(None, [bad])
    assert len(problems) == 1
    p = problems[0]
    assert p.source == f"override {bad!r}"
    assert "KEY=VALUE" in p.message
    assert f"override {bad!r}" in str(p)


def test_unknown_override_key_suggests_close_match():
    problems = _problems(None, ["train.lrr=0.1"])
    assert len(problems) == 1
    assert problems[0].field == "train.lrr"
    assert problems[0].source == "override 'train.lrr=0.1'"
    assert "did you mean 'lr'" in problems[0].message


def test_a_retired_setting_says_what_replaced_it(tmp_path):
    cfg = tmp_path / "old.yaml"
    cfg.write_text("export:\n  formats: [onnx]\n  onnx_int8: true\n  onnx_opset: 17\n")
    problems = {p.field: p for p in _problems(cfg, [])}
    assert set(problems) == {"export.onnx_int8", "export.onnx_opset"}
    assert problems["export.onnx_int8"].line == 3
    assert problems["export.onnx_int8"].message.startswith("no longer a setting: use export.onnx_quants: [int8]")
    assert "model builder" in problems["export.onnx_opset"].message


# --------------------------------------------------------------------------------------------
# Error messages for files
# --------------------------------------------------------------------------------------------

THREE_MISTAKES = """\
name: demo
lora:
  method: lorax
  r: 8
train:
  lrr: 0.001
  lr: fast
"""


def test_three_mistakes_give_three_problems(tmp_path):
    f = tmp_path / "three.yaml"
    f.write_text(THREE_MISTAKES)
    problems = _problems(f)
    assert len(problems) == 3
    by_field = {p.field: p for p in problems}
    assert set(by_field) == {"train.lrr", "lora.method", "train.lr"}

    for p in problems:
        assert p.source == str(f)
        assert str(p).startswith(f"{f}:{p.line}: {p.field}: ")

    method = by_field["lora.method"]
    assert method.line == 3
    assert "'lorax'" in method.message
    for allowed in ("'lora'", "'qlora'", "'dora'"):
        assert allowed in method.message

    lr = by_field["train.lr"]
    assert lr.line == 7
    assert "'fast'" in lr.message
    assert "number" in lr.message

    typo = by_field["train.lrr"]
    assert typo.line == 6
    assert "unknown field" in typo.message
    assert "did you mean 'lr'" in typo.message
    assert "Allowed here:" in typo.message and "grad_accum" in typo.message


def test_config_error_message_lists_every_problem(tmp_path):
    f = tmp_path / "three.yaml"
    f.write_text(THREE_MISTAKES)
    with pytest.raises(ConfigError) as exc_info:
        load_config(f)
    err = exc_info.value
    assert err.exit_code == 2
    lines = str(err).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{f}:") for line in lines)


def test_unknown_top_level_key_suggests_section(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("name: ok\ntrian:\n  lr: 0.1\n")
    problems = _problems(f)
    assert len(problems) == 1
    assert problems[0].field == "trian"
    assert problems[0].line == 2
    assert "did you mean 'train'" in problems[0].message


def test_unknown_key_without_close_match_lists_allowed(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("serve:\n  zzzzzz: 1\n")
    (p,) = _problems(f)
    assert p.field == "serve.zzzzzz"
    assert "did you mean" not in p.message
    assert "Allowed here:" in p.message and "port" in p.message


def test_constraint_and_validator_messages(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("serve:\n  port: 70000\nlora:\n  r: 0\nname: a/b\n")
    by_field = {p.field: p for p in _problems(f)}
    assert set(by_field) == {"serve.port", "lora.r", "name"}
    assert by_field["serve.port"].line == 2 and "70000" in by_field["serve.port"].message
    assert "65535" in by_field["serve.port"].message
    assert by_field["lora.r"].line == 4 and "positive" in by_field["lora.r"].message
    assert "'auto'" in by_field["lora.r"].message
    assert by_field["name"].line == 5 and "slash" in by_field["name"].message


def test_list_item_problem_points_at_the_item(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("eval:\n  metrics:\n    - perplexity\n    - rouge_l\n")
    (p,) = _problems(f)
    assert p.field == "eval.metrics.1"
    assert p.line == 4
    assert "'rouge_l'" in p.message and "'rougeL'" in p.message


def test_bad_item_in_union_list_field_is_one_problem(tmp_path):
    f = tmp_path / "u.yaml"
    f.write_text("lora:\n  target_modules: [q_proj, {v_proj: 1}]\n")
    problems = _problems(f)
    assert len(problems) == 1
    assert problems[0].field == "lora.target_modules.1"
    assert problems[0].line == 2
    assert "expected text" in problems[0].message


def test_numbers_are_accepted_as_text(tmp_path):
    """YAML reads `name: 2024` as a number; text fields take it as the text it means."""
    f = tmp_path / "n.yaml"
    f.write_text("name: 2024\nmodel:\n  revision: 1234567\n")
    cfg = load_config(f)
    assert cfg.name == "2024" and cfg.model.revision == "1234567"


def test_invalid_yaml_syntax_gives_one_problem_with_a_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: ok\ntrain:\n  lr: 0.1\n  epochs: [1, 2\nlora:\n  r: 4\n")
    problems = _problems(f)
    assert len(problems) == 1
    p = problems[0]
    assert p.source == str(f)
    assert "invalid YAML" in p.message
    assert p.line == 5  # where the parser gave up on the unclosed list of line 4
    assert str(p).startswith(f"{f}:{p.line}:")


def test_bad_indentation_reports_its_line(tmp_path):
    f = tmp_path / "indent.yaml"
    f.write_text("train:\n  lr: 0.1\n    epochs: 2\n")
    (p,) = _problems(f)
    assert "invalid YAML" in p.message
    assert p.line == 3


def test_top_level_list_is_a_clear_error(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- train\n- lora\n")
    (p,) = _problems(f)
    assert p.source == str(f)
    assert "expected a mapping" in p.message
    assert "list" in p.message
    assert "train" in p.message  # names the sections it expects


def test_section_that_is_not_a_mapping(tmp_path):
    f = tmp_path / "sec.yaml"
    f.write_text("train: 5\n")
    (p,) = _problems(f)
    assert p.field == "train"
    assert p.line == 1
    assert "5" in p.message


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    (p,) = _problems(missing)
    assert p.source == str(missing)
    assert p.message == "file not found"
    assert str(p) == f"{missing}: (top level): file not found"


def test_directory_is_not_a_file(tmp_path):
    (p,) = _problems(tmp_path)
    assert p.message == "not a file"


def test_non_utf8_file(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\xe9\n".encode("latin-1"))
    (p,) = _problems(f)
    assert "UTF-8" in p.message


# --------------------------------------------------------------------------------------------
# Round trip and reference
# --------------------------------------------------------------------------------------------


def test_to_yaml_round_trips_defaults(tmp_path):
    f = tmp_path / "defaults.yaml"
    f.write_text(RunConfig().to_yaml())
    assert load_config(f) == RunConfig()


def test_to_yaml_round_trips_non_defaults(tmp_path):
    cfg = load_config(
        QUICKSTART,
        [
            "name=roundtrip",
            "train.lr=1e-10",
            "train.epochs=2.5",
            "train.resume=true",
            "lora.r=32",
            "lora.alpha=7",
            "lora.target_modules=[q_proj,v_proj]",
            "data.source=[a.jsonl,'b.csv']",
            "data.columns={instruction: prompt}",
            "data.max_length=300",
            "data.system_prompt='yes: no'",
            "serve.api_key='123'",
        ],
    )
    assert cfg.data.system_prompt == "yes: no"
    text = cfg.to_yaml()
    assert yaml.safe_load(text)["train"]["lr"] == pytest.approx(1e-10)
    f = tmp_path / "rt.yaml"
    f.write_text(text)
    again = load_config(f)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    assert again.to_yaml() == text


def test_reference_markdown_contains_every_dotted_field():
    md = config_reference_markdown()
    for dotted, info in ALL_FIELDS:
        if dotted in SECTIONS:
            assert f"### `{dotted}`" in md
        else:
            assert f"| `{dotted}` |" in md, dotted
            assert info.description.splitlines()[0] in md
    assert "| field | type | default | description |" in md
    # the default is shown in the field's row
    (row,) = [line for line in md.splitlines() if line.startswith("| `train.lr` |")]
    assert "`0.0002`" in row and "Peak learning rate." in row


def test_eval_needs_at_least_one_metric():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["eval.metrics=[]"])
    assert "eval.metrics" in str(e.value)


# ---------------------------------------------------------------- check_local_paths (config validate)


def _check(tmp_path: Path, text: str, overrides: list[str] | None = None, name: str = "run.yaml"):
    from loratui.pipeline.config import check_local_paths

    path = tmp_path / "cfgdir" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    cfg = load_config(path, overrides)
    return {p.field: p for p in check_local_paths(cfg, path, overrides)}


def test_local_paths_that_exist_or_are_not_paths_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# a\n")
    (tmp_path / "t1.jsonl").write_text("{}\n")
    (tmp_path / "adapter").mkdir()
    text = (
        "model:\n  base: HuggingFaceTB/SmolLM2-135M-Instruct\n"  # a hub id: the data step fetches it
        "data:\n  source: [quickstart, docs/, 't*.jsonl']\n  val_source: t1.jsonl\n"
        "lora:\n  init_from: adapter\n"
        "eval:\n  model: runs/quickstart/merged\n  retention_sources: [quickstart-more]\n"  # made by the run
        "merge:\n  adapter: runs/quickstart/adapter\n"
    )
    assert _check(tmp_path, text) == {}
    assert _check(tmp_path, "model:\n  base: smollm2-135m-instruct\n") == {}


def test_each_missing_local_path_is_one_problem_with_field_line_and_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    text = (
        "model:\n  base: ./models/mine.gguf\n"
        "data:\n  source: [quickstart, nowhere.jsonl, 'x/*.csv', empty]\n  test_source: /abs/test.jsonl\n"
        "lora:\n  init_from: runs/old/adapter\n"
        "eval:\n  retention_sources: [old.jsonl]\n"
        "serve:\n  artifact: exports/model.gguf\n"
    )
    problems = _check(tmp_path, text)
    assert set(problems) == {
        "model.base",
        "data.source",
        "data.test_source",
        "lora.init_from",
        "eval.retention_sources",
        "serve.artifact",
    }
    # one problem per missing item of a list; the field and the line of the list item
    from loratui.pipeline.config import check_local_paths

    cfg_path = tmp_path / "cfgdir" / "run.yaml"
    sources = [p for p in check_local_paths(load_config(cfg_path), cfg_path) if p.field == "data.source"]
    assert [p.line for p in sources] == [4, 4, 4]  # a flow list sits on one line
    assert "'nowhere.jsonl': no such file, folder or bundled dataset" in sources[0].message
    assert "'x/*.csv': no files match this pattern" in sources[1].message
    assert "'empty': folder has no data files" in sources[2].message
    assert f"resolved against the working directory {tmp_path}" in sources[0].message
    assert "resolved against" not in problems["data.test_source"].message  # absolute: nothing to resolve
    assert str(problems["model.base"]).startswith(f"{cfg_path}:2: model.base: './models/mine.gguf': ")
    assert "not a built-in model (smollm2-135m-instruct, gemma3-270m)" in problems["model.base"].message


def test_a_path_relative_to_the_config_file_gets_the_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfgdir" / "data").mkdir(parents=True)
    (tmp_path / "cfgdir" / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "cfgdir" / "data" / "more.jsonl").write_text("{}\n")
    problems = _check(tmp_path, "data:\n  source: data/train.jsonl\n  val_source: 'data/m*.jsonl'\n")
    for field in ("data.source", "data.val_source"):
        message = problems[field].message
        assert f"resolved against the working directory {tmp_path}" in message
        assert (
            f"it is there relative to the config file ({tmp_path / 'cfgdir'}), but relative paths resolve against "
            f"the working directory; run from {tmp_path / 'cfgdir'} or use an absolute path"
        ) in message
    monkeypatch.chdir(tmp_path / "cfgdir")
    assert _check(tmp_path, "data:\n  source: data/train.jsonl\n") == {}


def test_a_path_from_an_override_names_the_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problems = _check(tmp_path, "name: r\n", ["merge.adapter=elsewhere/adapter"])
    assert problems["merge.adapter"].source == "override 'merge.adapter=elsewhere/adapter'"
    assert problems["merge.adapter"].line is None
