"""Validation issues and how pydantic's errors become them.

An :class:`Issue` is one error or warning about a config document: which document
(``"train"`` or ``"model"``), where in it (``loc``, the keys from the document's top level) and a
complete sentence. :class:`ConfigError` carries every issue found. :func:`convert` and
:func:`unknown_keys` turn a pydantic ``ValidationError`` of a document into issues with readable
messages (no URLs, no "Input should be") and suggestions for misspelt keys.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError

__all__ = [
    "Document",
    "Issue",
    "ConfigError",
    "RuleErrors",
    "convert",
    "dotted",
    "short",
    "unwrap",
    "unknown_keys",
]

#: The two documents of a job: the train config and the model config.
Document = Literal["train", "model"]


@dataclass(frozen=True)
class Issue:
    """One validation error or warning.

    ``document`` is the document it is about (``"train"`` or ``"model"``); ``loc`` is the path of
    the offending key inside that document (``("train", "micro_batch_size")``, ``("n_head",)``);
    ``message`` is a complete sentence. ``str(issue)`` is ``"train.micro_batch_size: message"``;
    a model-config issue reads ``"model.n_head: message"``.
    """

    loc: tuple[str | int, ...]
    message: str
    document: Document = "train"

    @property
    def path(self) -> str:
        """The location as a dotted path (``train.micro_batch_size``; list indices as ``[0]``);
        a model-config location starts with ``model`` (``model.n_head``)."""
        out = "model" if self.document == "model" else ""
        for part in self.loc:
            if isinstance(part, int):
                out += f"[{part}]"
            else:
                out += ("." if out else "") + str(part)
        return out

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def to_dict(self) -> dict[str, str]:
        """JSON-friendly form: ``{"loc": "train.micro_batch_size", "message": "..."}``."""
        return {"loc": self.path, "message": self.message}


class ConfigError(ValueError):
    """Invalid configuration. ``.errors`` lists every problem found; ``str()`` gives one per line."""

    def __init__(self, errors: list[Issue] | Issue | str):
        if isinstance(errors, str):
            errors = [Issue((), errors)]
        elif isinstance(errors, Issue):
            errors = [errors]
        self.errors: list[Issue] = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


# --------------------------------------------------------------------------------------------------
# Error conversion
# --------------------------------------------------------------------------------------------------


class RuleErrors(ValueError):
    """Raised inside model validators: several (field, message) errors at once."""

    def __init__(self, errors: typing.Sequence[tuple[str | tuple[str, ...], str]]):
        self.errors = [((f,) if isinstance(f, str) else tuple(f), m) for f, m in errors]
        super().__init__("; ".join(m for _, m in errors))


def unwrap(annotation: Any) -> list[Any]:
    """All concrete classes inside an annotation (Optional / Union / Annotated unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        out = []
        for a in typing.get_args(annotation):
            out.extend(unwrap(a))
        return out
    return [annotation]


def _sub_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    info = model.model_fields.get(key)
    if info is None:
        return None
    for cls in unwrap(info.annotation):
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            return cls
    return None


def _all_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name in model.model_fields:
        out.append(prefix + (name,))
        sub = _sub_model(model, name)
        if sub is not None:
            out.extend(_all_paths(sub, prefix + (name,)))
    return out


def dotted(loc: typing.Sequence[str | int]) -> str:
    """``loc`` as a dotted path: ``("train", "devices")`` -> ``train.devices``, list indices as
    ``[0]``."""
    return Issue(tuple(loc), "").path


def unknown_keys(
    data: Any,
    model: type[BaseModel],
    root: type[BaseModel],
    document: Document,
    path: tuple = (),
    other_root: type[BaseModel] | None = None,
    other_name: str = "",
) -> list[Issue]:
    """Issues for keys of ``data`` that ``model`` (at ``path`` inside ``root``, the root model of
    ``document``) does not define."""
    issues: list[Issue] = []
    if not isinstance(data, dict):
        return issues
    fields = list(model.model_fields)
    for key, value in data.items():
        skey = str(key)
        if skey in model.model_fields:
            sub = _sub_model(model, skey)
            if sub is not None and isinstance(value, dict):
                issues.extend(
                    unknown_keys(value, sub, root, document, path + (skey,), other_root, other_name)
                )
            continue
        issues.append(
            Issue(
                path + (skey,),
                _suggest(skey, fields, root, path, other_root, other_name),
                document,
            )
        )
    return issues


def _suggest(
    key: str,
    fields: list[str],
    root: type[BaseModel],
    path: tuple,
    other_root: type[BaseModel] | None,
    other_name: str,
) -> str:
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]}?"
    # the same name elsewhere in this document?
    elsewhere = [p for p in _all_paths(root) if p[-1] == key and p[:-1] != path]
    if elsewhere:
        return f"unknown key here; did you mean {'.'.join(elsewhere[0])}?"
    if other_root is not None:
        there = [p for p in _all_paths(other_root) if p[-1] == key]
        if there:
            where = "" if len(there[0]) == 1 else f", as {'.'.join(there[0])}"
            return f"unknown key; {key} belongs in the {other_name}{where}"
    # a close name anywhere in this document
    names = {p[-1]: p for p in _all_paths(root)}
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.75)
    if close:
        return f"unknown key; did you mean {'.'.join(names[close[0]])}?"
    return "unknown key; valid keys here: " + ", ".join(fields)


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _num(value: Any) -> str:
    """Numbers as a person writes them (0.001, 1e-08, 0, 1.5); anything else via repr."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return short(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _message(err: typing.Mapping[str, Any]) -> str:
    """A readable sentence for one pydantic error (no URLs, no 'Input should be')."""
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"{short(got)} is not allowed; choose one of {ctx.get('expected', '')}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer, got {short(got)}"
    if kind == "finite_number":
        return f"must be a finite number, got {short(got)}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {short(got)}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {short(got)}"
    if kind in ("string_type",):
        return f"expected a string, got {short(got)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping (key: value), got {short(got)}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {short(got)}"
    if kind in ("string_too_long", "string_too_short"):
        size = len(got) if isinstance(got, str) else 0
        if kind == "string_too_long":
            return f"at most {ctx.get('max_length', 0):,} characters, got {size:,}"
        return f"at least {ctx.get('min_length')} characters, got {size}"
    if kind in ("too_short", "too_long"):
        return f"expected {ctx.get('expected', ctx.get('min_length', ''))} items, got {short(got)}"
    for bound, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx and kind in (
            "greater_than_equal",
            "greater_than",
            "less_than_equal",
            "less_than",
        ):
            return f"must be {op} {_num(ctx[bound])}, got {_num(got)}"
    if kind == "extra_forbidden":
        return "unknown key"
    msg = str(err.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def _clean_loc(loc: tuple, model: type[BaseModel]) -> tuple:
    """Drop pydantic's union/validator tags from a location, keeping field names and list indices."""
    out: list[str | int] = []
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            out.append(part)
            continue
        if current is not None and part in current.model_fields:
            out.append(part)
            current = _sub_model(current, part)
        elif current is None and not out:
            out.append(part)
        # else: a tag such as 'function-before[...]' or 'int' -> dropped
    return tuple(out)


def convert(exc: ValidationError, model: type[BaseModel], document: Document) -> list[Issue]:
    """The issues of ``exc``, raised when validating ``document`` with its root ``model``: one
    per error (unknown keys left out: :func:`unknown_keys` reports them with a suggestion), each
    :class:`RuleErrors` entry one issue."""
    issues: list[Issue] = []
    seen: set[tuple] = set()
    for err in exc.errors(include_url=False):
        if err.get("type") == "extra_forbidden":
            continue  # reported with a suggestion by unknown_keys
        loc = _clean_loc(tuple(err.get("loc", ())), model)
        original = err.get("ctx", {}).get("error") if err.get("ctx") else None
        if isinstance(original, RuleErrors):
            for fld, msg in original.errors:
                issues.append(Issue(loc + fld, msg, document))
            continue
        msg = _message(err)
        key = (loc, msg)
        if key in seen:
            continue
        seen.add(key)
        issues.append(Issue(loc, msg, document))
    return issues
