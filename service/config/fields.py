"""Field types shared by the two config documents: the base of every section (unknown keys
refused, finite floats, int64 integers, no boolean for a number), names and paths (length and
characters), and the value types LitGPT's keys accept in more than one spelling (``devices``,
``resume``, ``resume_allow_changes``, ``evaluate_example``, ``3e12`` for an integer).
"""

from __future__ import annotations

import math
import re
import typing
import unicodedata
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from service.config.issues import short, unwrap

#: The pydantic settings of every section: unknown keys refused, defaults validated, no NaN.
STRICT = ConfigDict(
    extra="forbid", validate_default=True, use_attribute_docstrings=False, allow_inf_nan=False
)

#: Largest integer any config field accepts: int64, what the databases and torch hold.
INT_MAX = 2**63 - 1
#: Largest ``n_layer`` accepted (the estimate walks the layers one by one).
MAX_LAYERS = 1024


#: Longest name (run name, model name, preset, LogArgs texts): the ``runs.name`` column's length.
MAX_NAME_CHARS = 200
#: Longest path a config may give (characters; Linux PATH_MAX less its NUL). Where it points on
#: the server is checked again in bytes (``service.config.paths.check_path_length``).
MAX_PATH_CHARS = 4095

#: Unicode categories refused in names: control characters (C0, DEL, C1: NUL, newline, escape...),
#: lone surrogates (not encodable: no file system or database stores them) and the line and
#: paragraph separators.
_NAME_REFUSED = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _codepoints(chars: set[str]) -> str:
    return ", ".join(f"U+{ord(c):04X}" for c in sorted(chars)[:5])


def check_name_text(value: str, what: str = "a name") -> str:
    """``value`` when it holds no control character, lone surrogate or line separator
    (:data:`_NAME_REFUSED`); raise ``ValueError`` naming the code points otherwise."""
    bad = {c for c in value if unicodedata.category(c) in _NAME_REFUSED}
    if bad:
        raise ValueError(f"control characters are not allowed in {what} (found {_codepoints(bad)})")
    return value


def check_path_text(value: str) -> str:
    """``value`` when no file system would refuse its characters: no NUL, no lone surrogate;
    raise ``ValueError`` otherwise."""
    bad = {c for c in value if c == "\x00" or unicodedata.category(c) == "Cs"}
    if bad:
        raise ValueError(f"a path cannot contain {_codepoints(bad)} (NUL or a lone surrogate)")
    return value


#: :func:`check_name_text` as a regular expression, for JSON Schema documents (the check itself
#: is the function, whose message names the code points). Lone surrogates are left out: no
#: pattern engine of a JSON Schema tool takes them, and UTF-8 JSON can only carry them escaped.
NAME_TEXT_REGEX = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"

#: A name or short free text: at most :data:`MAX_NAME_CHARS` characters, no control characters.
NameText = Annotated[
    str,
    Field(max_length=MAX_NAME_CHARS, json_schema_extra={"pattern": NAME_TEXT_REGEX}),
    AfterValidator(check_name_text),
]
#: A path in a config: at most :data:`MAX_PATH_CHARS` characters, no NUL or lone surrogate.
PathText = Annotated[str, Field(max_length=MAX_PATH_CHARS), AfterValidator(check_path_text)]


def _numeric_without_bool(annotation: Any) -> bool:
    kinds = unwrap(annotation)
    return bool not in kinds and any(k in (int, float) for k in kinds)


def _numeric_items(annotation: Any) -> bool:
    """Whether ``annotation`` is a list/tuple whose items are numbers that are not bools."""
    items = [
        a
        for k in unwrap(annotation)
        if typing.get_origin(k) in (list, tuple)
        for a in typing.get_args(k)
        if a is not Ellipsis
    ]
    return bool(items) and all(_numeric_without_bool(a) for a in items)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, floats must be finite
    (``allow_inf_nan=False``: YAML's ``.inf``/``.nan``), integers must fit in int64, and a
    boolean is never a number (``save_interval: true`` is refused, not read as 1). An integral
    float (``1e12``, ``4.0``) is accepted for an integer field as the integer it denotes; a
    fractional one (``2.5``) is refused."""

    model_config = STRICT

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field_info = cls.model_fields.get(info.field_name or "")
        if field_info is None:
            return value
        annotation = field_info.annotation
        if isinstance(value, bool) and _numeric_without_bool(annotation):
            kind = "an integer" if int in unwrap(annotation) else "a number"
            raise ValueError(
                f"expected {kind}, got {str(value).lower()} (a boolean is not a number)"
            )
        if (
            isinstance(value, (list, tuple))
            and any(isinstance(v, bool) for v in value)
            and _numeric_items(annotation)
        ):
            raise ValueError(
                f"expected numbers, got {short(list(value))} (a boolean is not a number)"
            )
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _fits_int64(cls, value: Any) -> Any:
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and not -INT_MAX <= value <= INT_MAX
        ):
            raise ValueError(
                f"must be at most {INT_MAX:,} in absolute value (int64), got a number "
                f"with {len(str(abs(value)))} digits"
            )
        return value


def _int_like(value: Any) -> Any:
    """Accept ``3e12``-style strings (PyYAML reads ``3e12`` as a string) for integer fields."""
    if isinstance(value, str):
        s = value.strip().replace("_", "")
        try:
            f = float(s)
        except ValueError:
            return value
        if math.isfinite(f) and f == int(f) and ("e" in s.lower() or "." in s):
            return int(f)
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return value


IntLike = Annotated[int, BeforeValidator(_int_like)]


def _devices(value: Any) -> Any:
    if value == "auto":
        return "auto"
    if isinstance(value, bool):
        raise ValueError(f"must be a positive integer or 'auto', got {value!r}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"must be a positive integer (>= 1) or 'auto', got {value}")
        return value
    raise ValueError(f"must be a positive integer or 'auto', got {value!r}")


Devices = Annotated[
    int | Literal["auto"],
    BeforeValidator(_devices),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]}),
]


def _resume(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        if low == "auto":
            return "auto"
        if not value.strip():
            raise ValueError(
                "must be true, false, 'auto' or a checkpoint folder path, got an empty string"
            )
        if len(value) > MAX_PATH_CHARS:
            raise ValueError(
                f"a checkpoint folder path has at most {MAX_PATH_CHARS:,} characters, "
                f"got {len(value):,}"
            )
        return check_path_text(value)
    raise ValueError(f"must be true, false, 'auto' or a checkpoint folder path, got {value!r}")


Resume = Annotated[
    bool | str,
    BeforeValidator(_resume),
    WithJsonSchema({"anyOf": [{"type": "boolean"}, {"const": "auto"}, {"type": "string"}]}),
]


#: What ``resume_allow_changes`` can accept on resume (see the field's description).
ResumeChange = Literal["data", "tokenizer", "schedule", "batch", "seq_len"]


def _allow_changes(value: Any) -> Any:
    # `resume_allow_changes: data` or "data,schedule" (a flag's value) read as a list
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


ResumeAllowChanges = Annotated[list[ResumeChange], BeforeValidator(_allow_changes)]


def _str_or_int(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"must be 'first', 'random' or an integer index, got {value!r}")
    return value


EvaluateExample = Annotated[
    str | int,
    BeforeValidator(_str_or_int),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 0}]}),
]

Precision = Literal["bf16-mixed", "bf16-true", "16-mixed", "16-true", "32-true"]


# -- tags and notes of runs (issue 11) ---------------------------------------------------------

#: Most tags a run carries.
MAX_TAGS = 32
#: Longest tag (characters).
TAG_MAX_CHARS = 64
#: Longest note (characters).
NOTE_MAX_CHARS = 10_000
#: What a tag is: a letter or digit, then letters, digits and ``_ . - : = + /`` (so
#: ``lr=3e-4``, ``exp:router-v2`` and ``team/alice`` are tags; spaces and commas are not).
TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:=+/-]*")
TAG_RULE = (
    f"1 to {TAG_MAX_CHARS} characters: a letter or digit, then letters, digits and _ . - : = + /"
)


def check_tag(value: str) -> str:
    """``value`` when it is a tag (:data:`TAG_PATTERN`, at most :data:`TAG_MAX_CHARS`
    characters); ValueError saying what a tag is otherwise."""
    if not (len(value) <= TAG_MAX_CHARS and TAG_PATTERN.fullmatch(value)):
        raise ValueError(f"invalid tag {value[:80]!r}: a tag is {TAG_RULE}")
    return value


def check_tags(values: Sequence[str]) -> list[str]:
    """Every tag of ``values`` checked (:func:`check_tag`), duplicates dropped (first kept, in
    order); ValueError for more than :data:`MAX_TAGS` distinct tags."""
    tags = list(dict.fromkeys(check_tag(v) for v in values))
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags per run, got {len(tags)}")
    return tags


def check_note(value: str) -> str:
    """``value`` when it is at most :data:`NOTE_MAX_CHARS` characters without control
    characters other than newline, carriage return and tab; ValueError otherwise."""
    if len(value) > NOTE_MAX_CHARS:
        raise ValueError(f"a note is at most {NOTE_MAX_CHARS} characters, got {len(value)}")
    bad = sorted({f"U+{ord(c):04X}" for c in value if _control(c)})
    if bad:
        raise ValueError(f"control characters are not allowed in a note (found {', '.join(bad)})")
    return value


def _control(c: str) -> bool:
    code = ord(c)
    return c not in "\n\r\t" and (code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xDFFF)


#: A run's tags in a request: a list of tags (:func:`check_tags`: each 1 to 64
#: characters, letters, digits and ``_ . - : = + /``; at most 32; duplicates dropped).
Tags = Annotated[
    list[str],
    Field(
        max_length=1000,
        description=f"Labels to find the run again; each {TAG_RULE}; at most "
        f"{MAX_TAGS} (duplicates dropped).",
    ),
    AfterValidator(check_tags),
]
#: A run's note in a request (:func:`check_note`).
Note = Annotated[
    str,
    Field(
        max_length=NOTE_MAX_CHARS,
        description=f"Free text, at most {NOTE_MAX_CHARS} characters (newlines and tabs allowed).",
    ),
    AfterValidator(check_note),
]
