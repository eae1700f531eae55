"""The sweep document (``POST /sweeps``), its checks and its points.

A document names a base (the ``POST /runs`` documents and preset), a search ``method``
(``grid``, ``random``, ``tpe``), a ``metric`` (a column of metrics.csv and whether lower or
higher is better) and ``parameters``: dotted paths into the two documents
(``train_config.optimizer.init_args.lr``, ``model_config.n_expert``) with their ``values`` or a
range (``min``, ``max``, ``distribution``). :func:`sweep_request` checks the envelope,
:func:`check_sweep` everything that needs the server (the base validates, the metric is logged,
the paths exist, every grid point validates). Refusals are
``service.submission.InvalidSubmission`` with request paths (``["body", "parameters",
"model_config.n_expert", "values"]``), so the API answers them as it answers a run's.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from sqlmodel import Session

from service.config.fields import NameText
from service.config.presets import list_presets
from service.contract import METRIC_COLUMNS
from service.settings import Settings
from service.submission import InvalidSubmission, Prepared, RunCreate, prepare_run, run_request
from service.webhooks import MAX_WEBHOOKS, SweepWebhook

__all__ = [
    "GRID_MAX_POINTS",
    "SWEEP_NAME_MAX",
    "ParameterSpec",
    "SweepCreate",
    "CheckedSweep",
    "sweep_request",
    "check_sweep",
    "trial_request",
    "grid_points",
]

#: Most points a grid may have.
GRID_MAX_POINTS = 1000
#: Longest sweep name: trials are named ``<sweep name>-<number>`` within a run name's 200.
SWEEP_NAME_MAX = 180
#: Metric columns a sweep may optimise (``step``, ``tokens`` and ``elapsed_s`` are no result).
SWEEP_METRICS = tuple(c for c in METRIC_COLUMNS if c not in ("tokens", "elapsed_s"))
#: Metrics written only by a validation pass.
VALIDATION_METRICS = frozenset({"val_loss", "val_ppl"})
DOCUMENTS = ("train_config", "model_config")

Scalar = StrictBool | StrictInt | StrictFloat | StrictStr | None
Number = StrictInt | StrictFloat


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ParameterSpec(_Strict):
    """One swept parameter: ``values`` (any method), or ``min``/``max``/``distribution``
    (random and tpe)."""

    values: list[Scalar] | None = Field(default=None, min_length=1, max_length=1000)
    min: Number | None = None
    max: Number | None = None
    distribution: Literal["uniform", "log_uniform", "int_uniform"] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ParameterSpec:
        ranged = (self.min, self.max, self.distribution)
        if self.values is not None:
            if any(v is not None for v in ranged):
                raise ValueError("give either values or min, max and distribution, not both")
            return self
        if any(v is None for v in ranged):
            raise ValueError("give values: [...] or all of min, max and distribution")
        assert self.min is not None and self.max is not None
        if not self.min < self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        if self.distribution == "log_uniform" and self.min <= 0:
            raise ValueError("log_uniform needs min > 0")
        if self.distribution == "int_uniform" and not (
            isinstance(self.min, int) and isinstance(self.max, int)
        ):
            raise ValueError("int_uniform needs integer min and max")
        return self


class MetricSpec(_Strict):
    name: Literal[SWEEP_METRICS] = Field(  # type: ignore[valid-type]  # a tuple of literals
        description="A column of metrics.csv: " + ", ".join(SWEEP_METRICS)
    )
    goal: Literal["minimize", "maximize"] = "minimize"


class EarlyStopping(_Strict):
    type: Literal["median"] = "median"
    min_steps: Annotated[int, Field(ge=0)] = Field(
        default=0, description="No trial is stopped before this optimizer step."
    )


class SweepBase(_Strict):
    train_config: dict[str, Any] = Field(default_factory=dict)
    model_doc: dict[str, Any] = Field(
        default_factory=dict, alias="model_config", serialization_alias="model_config"
    )
    preset: NameText | None = None


class SweepCreate(_Strict):
    """Body of ``POST /sweeps`` and ``POST /sweeps/validate`` (README "Sweeps")."""

    name: NameText = Field(min_length=1, max_length=SWEEP_NAME_MAX)
    base: SweepBase
    method: Literal["grid", "random", "tpe"]
    metric: MetricSpec
    parameters: dict[str, ParameterSpec] = Field(min_length=1, max_length=64)
    max_runs: Annotated[int, Field(ge=1, le=10_000)] | None = None
    max_concurrent: Annotated[int, Field(ge=1, le=1000)] = 1
    early_stopping: EarlyStopping | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**32 - 1)] = 0
    webhooks: list[SweepWebhook] = Field(
        default_factory=list,
        max_length=MAX_WEBHOOKS,
        description="Webhook subscriptions of the sweep's own end: at most 8 ``{url, events}`` "
        "(README: Webhooks). Trials notify the server's MOEJOBS_WEBHOOK_URLS only.",
    )


def _refusal(errors: list[dict[str, Any]], what: str = "the sweep") -> InvalidSubmission:
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"][1:])
    one = f"{where}: {first['msg']}" if where else first["msg"]
    message = one if len(errors) == 1 else f"{len(errors)} problems in {what}; first: {one}"
    return InvalidSubmission(message, code=errors[0]["type"], errors=errors)


def _error(loc: list[str | int], msg: str, type_: str = "validation_error") -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": type_}


def sweep_request(doc: Any) -> SweepCreate:
    """The sweep document from its parsed body; raises ``InvalidSubmission``
    (``validation_error``, every problem with its path under ``body``)."""
    if not isinstance(doc, dict):
        raise _refusal([_error(["body"], "the body must be a mapping (a sweep document)")])
    try:
        sweep = SweepCreate.model_validate(doc)
    except ValidationError as error:
        errors = []
        for err in error.errors():
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if err.get("type") == "missing":
                msg = "required key is missing"
            elif err.get("type") == "extra_forbidden":
                msg = "unknown key"
            loc = [p for p in err.get("loc", ()) if p not in _UNION_TAGS]
            errors.append(_error(["body", *loc], msg, "validation_error"))
        raise _refusal(errors) from None
    errors = []
    for path in sweep.parameters:
        head = path.split(".", 1)[0]
        if head not in DOCUMENTS or "." not in path or "" in path.split("."):
            errors.append(
                _error(
                    ["body", "parameters", path],
                    "a parameter is a dotted path starting with train_config. or model_config. "
                    "(e.g. train_config.optimizer.init_args.lr)",
                )
            )
    if sweep.method == "grid":
        for path, spec in sweep.parameters.items():
            if spec.values is None:
                errors.append(
                    _error(
                        ["body", "parameters", path],
                        "a grid takes values: [...] only (min/max ranges need random or tpe)",
                    )
                )
        size = grid_size(sweep)
        if size > GRID_MAX_POINTS:
            errors.append(
                _error(
                    ["body", "parameters"], f"the grid has {size} points; at most {GRID_MAX_POINTS}"
                )
            )
        elif sweep.max_runs is not None and sweep.max_runs < size:
            errors.append(
                _error(
                    ["body", "max_runs"],
                    f"a grid runs all of its {size} points; leave out max_runs or set it >= {size}",
                )
            )
    elif sweep.max_runs is None:
        errors.append(_error(["body", "max_runs"], f"required for method {sweep.method}"))
    if errors:
        raise _refusal(errors)
    return sweep


# pydantic names the member of a union that failed in the location; not a key of the document
_UNION_TAGS = frozenset({"bool", "int", "float", "str", "none", "list[...]"})


def grid_size(sweep: SweepCreate) -> int:
    size = 1
    for spec in sweep.parameters.values():
        size *= len(spec.values or [])
    return size


def grid_points(sweep: SweepCreate) -> list[dict[str, Any]]:
    """Every point of a grid, the first parameter varying slowest (document order)."""
    paths = list(sweep.parameters)
    lists = [sweep.parameters[p].values or [] for p in paths]
    return [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*lists)]


def trial_request(sweep: SweepCreate, number: int) -> RunCreate:
    """The ``POST /runs`` request of trial ``number``: the base, named ``<sweep name>-<number>``
    (its parameters are merged over the base and its preset by
    ``service.submission.prepare_run``'s ``params``)."""
    return run_request(
        {
            "name": f"{sweep.name}-{number}",
            "preset": sweep.base.preset,
            "train_config": sweep.base.train_config,
            "model_config": sweep.base.model_doc,
        }
    )


def _known_path(resolved: dict[str, Any], keys: list[str]) -> str | None:
    """None when ``keys`` names a key of the resolved document (or a new key of an
    ``init_args`` mapping, whose keys are the class's arguments); else what is wrong."""
    node: Any = resolved
    for i, key in enumerate(keys):
        if not isinstance(node, dict):
            return f"{'.'.join(keys[:i])} is not a mapping"
        if key not in node:
            if i == len(keys) - 1 and i > 0 and keys[i - 1] == "init_args":
                return None
            known = ", ".join(sorted(str(k) for k in node)[:30])
            return f"no key {key!r} at {'.'.join(keys[:i]) or 'the top'} (known: {known})"
        node = node[key]
    return None


@dataclass
class CheckedSweep:
    """A sweep that passed :func:`check_sweep`: the document and its grid points (empty for
    random and tpe)."""

    sweep: SweepCreate
    points: list[dict[str, Any]]
    warnings: list[dict[str, Any]]


def _point_label(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def check_sweep(session: Session, settings: Settings, sweep: SweepCreate) -> CheckedSweep:
    """Everything that needs the server: the base documents validate (as ``POST /runs``
    would: preset, configs, paths, admission), the metric is one the base logs, every path
    names a key of the resolved documents (a preset's key too: parameters win over the preset), and,
    for a grid, every
    point validates (a 422 listing each invalid point and its errors). Raises
    ``InvalidSubmission``."""
    if sweep.webhooks and settings.webhook_secret is None:
        raise _refusal(
            [
                _error(
                    ["body", "webhooks"],
                    "this server has no MOEJOBS_WEBHOOK_SECRET to sign webhook deliveries "
                    "with; ask its operator to set one, or leave webhooks out",
                )
            ]
        )
    if sweep.base.preset is not None and sweep.base.preset not in list_presets():
        raise _refusal(
            [
                _error(
                    ["body", "base", "preset"],
                    f"unknown preset {sweep.base.preset!r}; available: "
                    f"{', '.join(list_presets()) or 'none'}",
                )
            ]
        )
    base_request = trial_request(sweep, 0)
    try:
        prepared = prepare_run(session, settings, base_request, run_id=uuid.UUID(int=0))
    except InvalidSubmission as error:
        errors = [
            {**e, "loc": ["body", "base", *e["loc"][1:]]} if e["loc"][:1] == ["body"] else e
            for e in error.errors
        ]
        raise InvalidSubmission(
            f"the base config is invalid: {error.message}", code=error.code, errors=errors
        ) from None
    errors = _metric_errors(sweep, prepared) + _path_errors(sweep, prepared)
    if errors:
        raise _refusal(errors)
    points: list[dict[str, Any]] = []
    if sweep.method == "grid":
        points = grid_points(sweep)
        bad: list[dict[str, Any]] = []
        for number, params in enumerate(points):
            try:
                prepare_run(
                    session,
                    settings,
                    trial_request(sweep, number),
                    run_id=uuid.UUID(int=0),
                    params=params,
                )
            except InvalidSubmission as error:
                for e in error.errors:
                    bad.append(
                        _error(
                            ["body", "parameters"],
                            f"grid point {number} ({_point_label(params)}): "
                            f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}",
                            error.code,
                        )
                        | {"point": number, "params": params}
                    )
        if bad:
            count = len({e["point"] for e in bad})
            raise InvalidSubmission(
                f"{count} of the grid's {len(points)} points are invalid; first: {bad[0]['msg']}",
                code="invalid_config",
                errors=bad,
            )
    warnings = list(prepared.warnings)
    steps = prepared.validated.plan.optimizer_steps
    if sweep.early_stopping is not None and sweep.early_stopping.min_steps >= steps:
        warnings.append(
            {
                "loc": ["body", "early_stopping", "min_steps"],
                "msg": f"min_steps {sweep.early_stopping.min_steps} is not below the base's "
                f"{steps} optimizer steps: no trial can be pruned",
            }
        )
    return CheckedSweep(sweep=sweep, points=points, warnings=warnings)


def _metric_errors(sweep: SweepCreate, prepared: Prepared) -> list[dict[str, Any]]:
    """The metric must be one the base config logs: a validation metric needs periodic
    validation (``eval.interval`` > 0) or a final one (``eval.final_validation``); median
    early stopping on it needs the periodic one."""
    name = sweep.metric.name
    if name not in VALIDATION_METRICS:
        return []
    evaluation = prepared.validated.train.eval
    if sweep.early_stopping is not None and evaluation.interval == 0:
        return [
            _error(
                ["body", "metric", "name"],
                f"{name} is logged only by validation, and median early stopping compares it "
                f"during training, but the base config has train_config.eval.interval: 0; set "
                f"train_config.eval.interval to a number of steps (e.g. 10), or use loss",
            )
        ]
    if evaluation.interval == 0 and not evaluation.final_validation:
        return [
            _error(
                ["body", "metric", "name"],
                f"{name} is never logged by the base config (train_config.eval.interval: 0 and "
                f"train_config.eval.final_validation: false); set train_config.eval.interval "
                f"to a number of steps or train_config.eval.final_validation: true, or use loss",
            )
        ]
    return []


def _path_errors(sweep: SweepCreate, prepared: Prepared) -> list[dict[str, Any]]:
    resolved = {"train_config": prepared.resolved_train, "model_config": prepared.resolved_model}
    errors = []
    for path in sweep.parameters:
        head, *keys = path.split(".")
        problem = _known_path(resolved[head], keys)
        if problem is not None:
            errors.append(_error(["body", "parameters", path], f"unknown path: {problem}"))
            continue
    return errors
