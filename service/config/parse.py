"""Reading config documents: one parser for files and HTTP bodies.

YAML is read with PyYAML's safe loader, refusing what would make a document mean something
else than it shows: a key given twice in one mapping (PyYAML would keep the last silently) and
anchors/aliases (a few hundred bytes of nested aliases expand to gigabytes once serialised, the
"billion laughs" document). JSON refuses a key given twice as well. A parsed document must then
be plain JSON (:func:`document_problem`): string keys, no YAML dates or tagged values such as
``!!binary``, finite numbers, no NUL character, at most :data:`MAX_DOCUMENT_DEPTH` levels: what
every database stores and the engine reads back unchanged.

:func:`parse_yaml` and :func:`parse_json` raise :class:`DocumentError` (one line, with line and
column for a syntax error); :func:`load_document` reads a file and raises ``ConfigError`` naming
it. The API turns a ``DocumentError`` into a 422 at the body or form field it came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from service.config.fields import check_path_text
from service.config.issues import ConfigError, dotted

__all__ = [
    "MAX_DOCUMENT_DEPTH",
    "DocumentError",
    "ConfigLoader",
    "unique_json_object",
    "parse_yaml",
    "parse_json",
    "document_problem",
    "load_document",
]

#: Deepest nesting of lists and mappings a document may have (a config has 4 levels; deeper
#: structures would only reach the recursion limits of the serialisers).
MAX_DOCUMENT_DEPTH = 32


class DocumentError(ValueError):
    """A document that cannot be read: ``str()`` is one line saying why (``invalid YAML at line
    3, column 5: ...``)."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key written twice in one mapping (PyYAML would keep
    the last one silently, so a value the user wrote would be lost without a word) and
    anchors/aliases (nested aliases expand exponentially). Merge keys with a mapping written in
    place (``<<: {lr: 1}``) still override as YAML defines."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                "YAML aliases (*name) are not accepted by the API; write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            key = key_node.value
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first given on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def unique_json_object(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads`` ``object_pairs_hook`` that refuses a key given twice in one object.
    Raises ValueError naming the key."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_yaml(text: str | bytes) -> Any:
    """Parse a YAML (or JSON) document with :class:`ConfigLoader`; None for an empty one.
    Raises :class:`DocumentError` with line and column on syntax errors, for a duplicate key or
    an alias, a document nested too deeply for the parser, or a scalar no constructor takes (a
    5,000-digit integer)."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - safe loader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise DocumentError(f"invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise DocumentError("the document is nested too deeply") from None
    except (ValueError, OverflowError) as error:  # a scalar no constructor takes
        raise DocumentError(f"invalid YAML: {error}") from None


def parse_json(data: str | bytes) -> Any:
    """Parse a JSON document, refusing a key given twice in one object. Raises
    :class:`DocumentError` (with line and column on syntax errors)."""
    try:
        return json.loads(data, object_pairs_hook=unique_json_object)
    except json.JSONDecodeError as error:
        raise DocumentError(
            f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except (RecursionError, UnicodeDecodeError) as error:
        raise DocumentError(f"invalid JSON: {type(error).__name__}") from None
    except ValueError as error:  # a duplicate key
        raise DocumentError(f"invalid JSON: {error}") from None


def document_problem(doc: Any) -> tuple[tuple[str | int, ...], str] | None:
    """Why ``doc`` (a parsed config document) cannot be stored as JSON in every database:
    ``(location inside doc, message)``; None when it can. Refused: keys that are not strings,
    values that are not JSON (YAML dates, ``!!binary``, sets), NaN and infinities, a NUL
    character or lone surrogate in any key or value (PostgreSQL's jsonb refuses a NUL; UTF-8
    has no surrogates), and nesting deeper than :data:`MAX_DOCUMENT_DEPTH`. Iterative: any
    depth is answered."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(doc, ())]
    while stack:
        node, loc = stack.pop()
        if len(loc) > MAX_DOCUMENT_DEPTH:
            return loc[: MAX_DOCUMENT_DEPTH + 1], f"nested deeper than {MAX_DOCUMENT_DEPTH} levels"
        if isinstance(node, str):
            try:
                check_path_text(node)
            except ValueError:
                return (
                    loc,
                    "a NUL character or a lone surrogate is not allowed (no database stores it)",
                )
        elif isinstance(node, float):
            if node != node or node in (float("inf"), float("-inf")):
                return loc, f"must be a finite number, got {node}"
        elif isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    return (*loc, str(key)), (
                        f"keys must be strings, got {type(key).__name__} {key!r} (quote it)"
                    )
                try:
                    check_path_text(key)
                except ValueError:
                    return loc, "a key holds a NUL character or a lone surrogate"
                stack.append((value, (*loc, key)))
        elif isinstance(node, list):
            stack.extend((value, (*loc, i)) for i, value in enumerate(node))
        elif node is not None and not isinstance(node, (bool, int)):
            return loc, (
                f"a {type(node).__name__} is not a JSON value (YAML reads dates and "
                f"tagged values as such: quote it)"
            )
    return None


def load_document(path: str | Path) -> dict:
    """Read one config document (YAML, or JSON for ``.json``) into a dict.

    An empty file gives ``{}``. Raises `ConfigError` naming the file for a missing/unreadable file, a
    syntax error (with line and column), a top level that is not a mapping, or a value that is not
    plain JSON (:func:`document_problem`, naming its key).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    try:
        if p.suffix.lower() == ".json":
            data = parse_json(text) if text.strip() else {}
        else:
            data = parse_yaml(text)
    except DocumentError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping (key: value), got {type(data).__name__}"
        )
    problem = document_problem(data)
    if problem is not None:
        loc, message = problem
        where = f"{dotted(loc)}: " if loc else ""
        raise ConfigError(f"{p}: {where}{message}")
    return data
