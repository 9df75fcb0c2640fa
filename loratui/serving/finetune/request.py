"""The body of ``POST /v1/fine_tuning/jobs``, checked by a pydantic model, and the run config a job runs.

A bad parameter is a 400 in OpenAI's shape whose ``param`` names it (dotted for nested ones) and whose message
says what is allowed: :func:`parse` turns pydantic's first error into that message. loratui's own config
settings come in the ``loratui`` field or as ``metadata["loratui.<section>.<field>"]``
(:func:`client_settings`); only the sections that shape the training may change.

``method.type`` picks ``train.objective``: ``supervised`` (also when no method is given) trains ``sft``,
``dpo`` trains ``dpo`` with ``method.dpo.hyperparameters.beta`` as ``train.beta``; the other hyperparameters map
the same way for both (:func:`run_config`).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from pydantic_core import PydanticCustomError

from loratui.serving.errors import ApiError

if TYPE_CHECKING:
    from loratui.pipeline.config import RunConfig

HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
DPO_HYPERPARAMETERS = (*HYPERPARAMETERS, "beta")
# OpenAI's method types loratui trains, and the train.objective each runs
METHOD_OBJECTIVES = {"supervised": "sft", "dpo": "dpo"}
# Config a client may set per job (under `loratui` or `metadata["loratui.<key>"]`): the sections that shape the
# training. Never where the server reads or writes (paths), what code it trusts, or how it serves.
CLIENT_SECTIONS = ("data", "lora", "train", "eval", "merge", "export")
CLIENT_DENIED = {
    "data.source",
    "data.val_source",
    "data.test_source",
    "lora.init_from",
    "train.resume",
    "eval.model",
    "eval.retention_sources",
    "merge.adapter",
    "train.report_to",
}
# Settings the request's OpenAI parameters decide, so the job object says what the run does.
BY_METHOD = {
    "train.objective": "set by method.type ("
    + ", ".join(f"{t!r} trains {o}" for t, o in METHOD_OBJECTIVES.items())
    + "); give DPO's beta as method.dpo.hyperparameters.beta",
}
_KEY_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LORATUI_OBJECT = 'expected an object of config settings, e.g. {"lora": {"r": 16}, "train": {"lr": 1e-4}}'
_OURS = "fine_tuning_request"  # the type of the errors this module's validators raise, already worded

# What a parameter must be, for pydantic's errors about it ({input}: the value sent). A nested parameter
# without an entry is named by its nearest listed parent.
_WHAT = {
    "model": "required (a base model, a model this server serves, or an ft: model)",
    "training_file": "required (the id of a file uploaded with purpose fine-tune)",
    "validation_file": "no uploaded file {input}",
    "hyperparameters": "expected an object",
    "method": "expected an object with type 'supervised' or 'dpo'",
    "method.type": "{input} is not supported (loratui fine-tunes with 'supervised' or 'dpo')",
    "method.supervised": "expected an object",
    "method.supervised.hyperparameters": "expected an object",
    "method.dpo": "expected an object",
    "method.dpo.hyperparameters": "expected an object",
    "suffix": "up to 64 letters, digits, '.', '_' or '-'",
    "seed": "expected a non-negative integer, got {input}",
    "metadata": "up to 16 string keys (64 characters) and string values (512)",
    "integrations": "not supported; set loratui.train.report_to on the server's job template instead",
    "loratui": _LORATUI_OBJECT,
}
_CODES = {"validation_file": "file_not_found"}


def _empty_is_none(value: Any) -> Any:
    """OpenAI's clients send an empty object or list, or null, for a parameter they leave out."""
    return value or None


def _auto_or(kind: type[int] | type[float]) -> BeforeValidator:
    """'auto' (also for null), else a positive number of ``kind`` (an integral float for an int)."""
    what = "a positive integer" if kind is int else "a positive number"

    def check(value: Any) -> Any:
        if value is None or value == "auto":
            return "auto"
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (kind is float or float(value).is_integer()) or value <= 0:
            raise PydanticCustomError(_OURS, f"expected 'auto' or {what}, got {value!r}")
        return kind(value)

    return BeforeValidator(check)


class Hyperparameters(BaseModel):
    """OpenAI's hyperparameters: each 'auto' (the server's job template decides) or a positive number."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Annotated[Literal["auto"] | int, _auto_or(int)] = "auto"
    batch_size: Annotated[Literal["auto"] | int, _auto_or(int)] = "auto"  # examples per optimizer step
    learning_rate_multiplier: Annotated[Literal["auto"] | float, _auto_or(float)] = "auto"  # times the template's lr


class DpoHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters: the supervised ones plus ``beta`` (``train.beta``; 'auto': the template's)."""

    beta: Annotated[Literal["auto"] | float, _auto_or(float)] = "auto"


class Supervised(BaseModel):
    hyperparameters: Annotated[Hyperparameters | None, BeforeValidator(_empty_is_none)] = None


class Dpo(BaseModel):
    hyperparameters: Annotated[DpoHyperparameters | None, BeforeValidator(_empty_is_none)] = None


class Method(BaseModel):
    type: Literal["supervised", "dpo"] = Field(None, validate_default=True)  # so a missing type is refused too
    supervised: Annotated[Supervised | None, BeforeValidator(_empty_is_none)] = None
    dpo: Annotated[Dpo | None, BeforeValidator(_empty_is_none)] = None

    def given(self) -> Hyperparameters | None:
        """The hyperparameters given under this method's own key (``method.<type>.hyperparameters``)."""
        own = self.dpo if self.type == "dpo" else self.supervised
        return own.hyperparameters if own else None


_Metadata = Annotated[
    dict[Annotated[StrictStr, Field(max_length=64)], Annotated[StrictStr, Field(max_length=512)]],
    Field(max_length=16),
]


class JobRequest(BaseModel):
    """What ``POST /v1/fine_tuning/jobs`` may hold; other fields are ignored, as OpenAI's API does."""

    model: StrictStr
    training_file: StrictStr
    validation_file: StrictStr | None = None
    hyperparameters: Annotated[Hyperparameters | None, BeforeValidator(_empty_is_none)] = None
    method: Annotated[Method | None, BeforeValidator(_empty_is_none)] = None
    suffix: Annotated[StrictStr, BeforeValidator(lambda v: v or ""), Field(pattern=r"^[A-Za-z0-9._-]{0,64}$")] = ""
    seed: Annotated[StrictInt, Field(ge=0)] | None = None
    metadata: Annotated[_Metadata | None, BeforeValidator(_empty_is_none)] = None
    integrations: Annotated[None, BeforeValidator(_empty_is_none)] = None  # none supported
    loratui: dict[str, Any] | None = None  # config settings (client_settings checks them)

    @property
    def method_type(self) -> Literal["supervised", "dpo"]:
        """OpenAI's method type (``supervised`` when the request names none, as OpenAI's API does)."""
        return self.method.type if self.method else "supervised"

    def hyper(self) -> Hyperparameters:
        """``hyperparameters``, overridden by ``method.<type>.hyperparameters``; every field set (beta apart)."""
        merged = Hyperparameters().model_dump()
        for given in (self.hyperparameters, self.method and self.method.given()):
            merged.update(given.model_dump(exclude_unset=True, include=set(HYPERPARAMETERS)) if given else {})
        return Hyperparameters.model_validate(merged)

    def beta(self) -> Literal["auto"] | float | None:
        """DPO's ``beta`` as asked ('auto' unless given); None for a supervised job."""
        if self.method_type != "dpo":
            return None
        given = self.method and self.method.given()
        return given.beta if isinstance(given, DpoHyperparameters) else "auto"

    def settings(self) -> dict[str, Any]:
        """The loratui config settings the request sets, by dotted name; 400 for any a client may not set."""
        return client_settings(self.loratui, self.metadata)


def parse(body: dict[str, Any]) -> JobRequest:
    """The request in ``body``; :class:`ApiError` (400) naming the first bad parameter."""
    try:
        req = JobRequest.model_validate(body)
    except ValidationError as e:
        raise _bad_request(e) from None
    other = {"supervised": "dpo", "dpo": "supervised"}[req.method_type]
    if req.method and getattr(req.method, other) is not None:
        raise ApiError(
            400,
            f"method.{other}: not used with method.type {req.method_type!r} "
            f"(give the hyperparameters as method.{req.method_type}.hyperparameters)",
            param=f"method.{other}",
        )
    return req


def _bad_request(error: ValidationError) -> ApiError:
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    if loc[:3] == ["method", "supervised", "hyperparameters"] and len(loc) > 3:
        loc = loc[2:]  # one set of hyperparameters to the client, wherever it gave them: hyperparameters.<name>
    if first["type"] == _OURS:
        param, text = ".".join(loc), first["msg"]
    elif first["type"] == "extra_forbidden":  # only the hyperparameters forbid other fields
        known = DPO_HYPERPARAMETERS if loc[:2] == ["method", "dpo"] else HYPERPARAMETERS
        param, text = ".".join(loc), f"unknown (known: {', '.join(known)})"
    else:
        named = [".".join(loc[:n]) for n in range(len(loc), 0, -1) if ".".join(loc[:n]) in _WHAT]
        param = named[0] if named else ".".join(loc)
        text = _WHAT.get(param, first["msg"]).replace("{input}", repr(first.get("input")))
    return ApiError(400, f"{param}: {text}", param=param, code=_CODES.get(param))


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def client_settings(extension: Any, metadata: dict[str, str] | None) -> dict[str, Any]:
    """loratui settings of a job request: the ``loratui`` field (nested or dotted) and ``metadata`` keys
    ``loratui.<section>.<field>`` (values parsed as YAML). Only training settings; paths and trust are refused."""
    found: dict[str, Any] = {}
    if extension is not None:
        if not isinstance(extension, dict):
            raise ApiError(400, f"loratui: {_LORATUI_OBJECT}", param="loratui")
        _flatten("", extension, found)
    for key, value in (metadata or {}).items():
        if key.startswith("loratui."):
            try:
                found[key.removeprefix("loratui.")] = yaml.safe_load(value) if value.strip() else ""
            except yaml.YAMLError:
                found[key.removeprefix("loratui.")] = value
    for key in found:
        _check_setting(key)
    return found


def _check_setting(key: str) -> None:
    parts = key.split(".")
    if not all(_KEY_PART.fullmatch(part) for part in parts):
        raise ApiError(
            400, f"loratui.{key}: not a config setting (dotted names of letters, digits and _)", param=f"loratui.{key}"
        )
    if key in BY_METHOD:
        raise ApiError(400, f"loratui.{key}: {BY_METHOD[key]}", param=f"loratui.{key}")
    if parts[0] not in CLIENT_SECTIONS or key in CLIENT_DENIED or len(parts) < 2:
        allowed = ", ".join(f"{s}.*" for s in CLIENT_SECTIONS)
        raise ApiError(
            400,
            f"loratui.{key}: not a setting a job request may change (allowed: {allowed}; "
            f"except {', '.join(sorted(CLIENT_DENIED))})",
            param=f"loratui.{key}",
        )


def run_config(
    template: dict[str, Any], request: JobRequest, settings: dict[str, Any], base: str, sources: dict[str, Path]
) -> dict[str, Any]:
    """The config (as data) of a job's run: the server's ``template``, the request's hyperparameters, seed and
    config ``settings``, training ``base`` and the uploads' ``sources`` (by parameter name). Name, runs_dir and
    trust stay the caller's to set."""
    data = copy.deepcopy(template)
    data["serve"] = {**data.get("serve", {}), "api_key": None}
    data.setdefault("model", {})["base"] = base
    data.setdefault("data", {}).update(
        source=[str(sources["training_file"])],
        val_source=str(sources["validation_file"]) if "validation_file" in sources else None,
    )
    train = data.setdefault("train", {})
    _apply_hyperparameters(train, request.hyper())
    train["objective"] = METHOD_OBJECTIVES[request.method_type]
    beta = request.beta()
    if beta not in (None, "auto"):
        train["beta"] = beta
    if request.seed is not None:
        data["train"]["seed"] = data["data"]["seed"] = request.seed
    for key, value in settings.items():
        _set(data, key, value)
    return data


def _apply_hyperparameters(train: dict[str, Any], hyper: Hyperparameters) -> None:
    if hyper.n_epochs != "auto":
        train["epochs"] = hyper.n_epochs
    if hyper.batch_size != "auto":
        train["effective_batch"] = hyper.batch_size
        train["grad_accum"] = "auto"
    if hyper.learning_rate_multiplier != "auto":
        train["lr"] = float(train.get("lr", 2e-4)) * hyper.learning_rate_multiplier


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *path, last = key.split(".")
    for part in path:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ApiError(400, f"loratui.{key}: {part} is a setting, not a section", param=f"loratui.{key}")
        node = child
    node[last] = value


def validated(data: dict[str, Any]) -> RunConfig:
    """``data`` as a run config; 400 naming the first setting that is wrong, and what is allowed."""
    from loratui.pipeline.config import RunConfig

    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ApiError(
            400, f"loratui.{where}: {first.get('msg')} (got {first.get('input')!r})", param=f"loratui.{where}"
        ) from None
