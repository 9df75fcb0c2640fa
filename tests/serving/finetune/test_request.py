"""The create-job request: its checks, and the config settings a client may set."""

from __future__ import annotations

import pytest

from loratui.serving.errors import ApiError
from loratui.serving.finetune import client_settings
from loratui.serving.finetune.request import parse


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
            "method.type: None is not supported (loratui fine-tunes with 'supervised')",
            "method.type",
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
