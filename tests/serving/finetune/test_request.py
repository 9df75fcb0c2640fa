"""The create-job request: its checks, and the config settings a client may set."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratui.pipeline.config import load_config
from loratui.serving.errors import ApiError
from loratui.serving.finetune import client_settings
from loratui.serving.finetune.request import Hyperparameters, parse, run_config, validated


def test_client_settings_take_training_sections_only():
    assert client_settings({"lora": {"r": 8}, "train.lr": 1e-4}, {"loratui.lora.method": "dora", "team": "x"}) == {
        "lora.r": 8,
        "train.lr": 1e-4,
        "lora.method": "dora",
    }
    for bad in (
        {"runs_dir": "/tmp"},
        {"serve": {"api_key": "k"}},
        {"model": {"base": "x"}},
        {"train": {"resume": True}},
        {"eval": {"retention_sources": ["/etc/passwd"]}},
    ):
        with pytest.raises(ApiError, match="not a setting a job request may change"):
            client_settings(bad, None)
    with pytest.raises(ApiError, match="expected an object"):
        client_settings(["lora.r=8"], None)
    for sneaky in ({"data": {"source ": ["/etc/hosts"]}}, {"data": {'source=["/etc/hosts"] #': 1}}):
        with pytest.raises(ApiError, match="not a config setting"):
            client_settings(sneaky, None)
    with pytest.raises(ApiError, match="not a config setting"):
        client_settings(None, {"loratui.eval.model ": "/elsewhere"})
    # the objective is the method's: the job object says what the run trains
    for extension, metadata in (({"train": {"objective": "orpo"}}, None), (None, {"loratui.train.objective": "dpo"})):
        with pytest.raises(ApiError) as e:
            client_settings(extension, metadata)
        assert e.value.param == "loratui.train.objective"
        assert e.value.message.startswith(
            "loratui.train.objective: set by method.type ('supervised' trains sft, 'dpo' trains dpo)"
        )
    assert client_settings({"train": {"beta": 0.3}}, None) == {"train.beta": 0.3}


BASE = {"model": "tiny", "training_file": "file-" + "0" * 24}


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({}, "model: required (a base model", "model"),
        ({"model": "tiny"}, "training_file: required (the id of a file", "training_file"),
        ({**BASE, "validation_file": 5}, "validation_file: no uploaded file 5", "validation_file"),
        ({**BASE, "hyperparameters": [1]}, "hyperparameters: expected an object", "hyperparameters"),
        (
            {**BASE, "hyperparameters": {"n_epochs": 2.5}},
            "hyperparameters.n_epochs: expected 'auto' or a positive integer, got 2.5",
            "hyperparameters.n_epochs",
        ),
        (
            {**BASE, "hyperparameters": {"batch_size": True}},
            "hyperparameters.batch_size: expected 'auto' or a positive integer, got True",
            "hyperparameters.batch_size",
        ),
        (
            {**BASE, "hyperparameters": {"learning_rate_multiplier": 0}},
            "hyperparameters.learning_rate_multiplier: expected 'auto' or a positive number, got 0",
            "hyperparameters.learning_rate_multiplier",
        ),
        (
            {**BASE, "hyperparameters": {"lr": 1}},
            "hyperparameters.lr: unknown (known: n_epochs, ",
            "hyperparameters.lr",
        ),
        (
            {**BASE, "method": {"supervised": {"hyperparameters": {"n_epochs": 1}}}},
            "method.type: None is not supported (loratui fine-tunes with 'supervised' or 'dpo')",
            "method.type",
        ),
        (
            {**BASE, "method": {"type": "reinforcement"}},
            "method.type: 'reinforcement' is not supported (loratui fine-tunes with 'supervised' or 'dpo')",
            "method.type",
        ),
        (
            {**BASE, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -0.1}}}},
            "method.dpo.hyperparameters.beta: expected 'auto' or a positive number, got -0.1",
            "method.dpo.hyperparameters.beta",
        ),
        (
            {**BASE, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}}},
            "method.dpo.hyperparameters.beta: expected 'auto' or a positive number, got 'high'",
            "method.dpo.hyperparameters.beta",
        ),
        (
            {**BASE, "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 0}}}},
            "method.dpo.hyperparameters.n_epochs: expected 'auto' or a positive integer, got 0",
            "method.dpo.hyperparameters.n_epochs",
        ),
        (
            {**BASE, "method": {"type": "dpo", "dpo": {"hyperparameters": {"gamma": 1}}}},
            "method.dpo.hyperparameters.gamma: unknown (known: n_epochs, batch_size, learning_rate_multiplier, beta)",
            "method.dpo.hyperparameters.gamma",
        ),
        (
            {**BASE, "method": {"type": "dpo", "dpo": 3}},
            "method.dpo: expected an object",
            "method.dpo",
        ),
        (
            {**BASE, "method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}},
            "hyperparameters.beta: unknown (known: n_epochs, batch_size, learning_rate_multiplier)",
            "hyperparameters.beta",
        ),
        (
            {**BASE, "method": {"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 1}}}},
            "method.supervised: not used with method.type 'dpo' (give the hyperparameters as "
            "method.dpo.hyperparameters)",
            "method.supervised",
        ),
        (
            {**BASE, "method": {"type": "supervised", "dpo": {"hyperparameters": {"beta": 1}}}},
            "method.dpo: not used with method.type 'supervised'",
            "method.dpo",
        ),
        (
            {**BASE, "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
            "hyperparameters.n_epochs: expected 'auto' or a positive integer, got 0",
            "hyperparameters.n_epochs",
        ),
        (
            {**BASE, "method": {"type": "supervised", "supervised": {"hyperparameters": "x"}}},
            "method.supervised.hyperparameters: expected an object",
            "method.supervised.hyperparameters",
        ),
        ({**BASE, "suffix": "x" * 65}, "suffix: up to 64 letters", "suffix"),
        ({**BASE, "seed": -1}, "seed: expected a non-negative integer, got -1", "seed"),
        ({**BASE, "seed": "1"}, "seed: expected a non-negative integer, got '1'", "seed"),
        ({**BASE, "metadata": {"k": 1}}, "metadata: up to 16 string keys", "metadata"),
        ({**BASE, "metadata": {str(i): "v" for i in range(17)}}, "metadata: up to 16 string keys", "metadata"),
        ({**BASE, "integrations": [{"type": "wandb"}]}, "integrations: not supported", "integrations"),
        ({**BASE, "loratui": [1]}, "loratui: expected an object of config settings", "loratui"),
    ],
)
def test_a_bad_request_names_the_parameter_and_what_it_must_be(body, message, param):
    with pytest.raises(ApiError) as e:
        parse(body)
    assert e.value.message.startswith(message) and e.value.param == param and e.value.status == 400


def test_left_out_parameters_and_both_hyperparameter_places():
    req = parse({**BASE, "suffix": None, "metadata": {}, "hyperparameters": None, "integrations": [], "method": None})
    assert (req.suffix, req.metadata, req.seed) == ("", None, None)
    assert req.hyper().model_dump() == {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    req = parse(
        {
            **BASE,
            "hyperparameters": {"n_epochs": 2.0, "batch_size": 8},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": "auto"}}},
        }
    )
    assert req.hyper().model_dump() == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"}


def test_a_dpo_request_makes_a_dpo_run():
    template = load_config(None, ["train.lr=1e-3", "train.beta=0.2"]).model_dump(mode="json")
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5, "n_epochs": 3, "learning_rate_multiplier": 0.5}}}
    req = parse({**BASE, "hyperparameters": {"batch_size": 4, "n_epochs": 1}, "method": dpo})
    assert (req.method_type, req.beta()) == ("dpo", 0.5)
    assert req.hyper().model_dump() == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.5}
    data = run_config(template, req, req.settings(), "tiny", {"training_file": Path("/up/a.jsonl")})
    train = validated({**data, "name": "x"}).train
    assert (train.objective, train.beta, train.epochs, train.effective_batch) == ("dpo", 0.5, 3, 4)
    assert train.lr == pytest.approx(5e-4)

    auto = parse({**BASE, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto"}}}})
    assert auto.beta() == "auto"
    train = validated(run_config(template, auto, {}, "tiny", {"training_file": Path("/up/a.jsonl")})).train
    assert (train.objective, train.beta) == ("dpo", 0.2)  # 'auto': the job template's beta
    bare = parse({**BASE, "method": {"type": "dpo"}})
    assert bare.beta() == "auto" and bare.hyper().model_dump() == Hyperparameters().model_dump()
    default = load_config(None, []).model_dump(mode="json")
    assert validated(run_config(default, bare, {}, "tiny", {"training_file": Path("/a.jsonl")})).train.beta == 0.1

    # supervised, named or not, trains sft whatever objective the template has
    dpo_template = load_config(None, ["train.objective=dpo"]).model_dump(mode="json")
    for body in (BASE, {**BASE, "method": {"type": "supervised"}}):
        req = parse(body)
        assert (req.method_type, req.beta()) == ("supervised", None)
        assert run_config(dpo_template, req, {}, "tiny", {"training_file": Path("/a.jsonl")})["train"]["objective"] == (
            "sft"
        )
