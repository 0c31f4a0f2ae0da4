"""Typed, frozen run configuration: defaults <- TOML file <- `key.sub=value` overrides.

Every component declares one frozen dataclass, each field with a one-line comment (its doc);
the launcher nests them into `RunConfig`. Loading is strict: an unknown key or a value of the
wrong type is a one-line `ConfigError` naming the key, where it came from and, for typos, the
closest valid key. Nothing here knows what the fields mean.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import io
import json
import tokenize
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, always one line, naming the key and its source."""


@functools.cache
def _module_docs(filename: str) -> dict[str, dict[str, str]]:
    source = Path(filename).read_text()
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    standalone = {n for n in comments if lines[n - 1].lstrip().startswith("#")}
    out: dict[str, dict[str, str]] = {}
    for class_def in ast.parse(source).body:
        if not isinstance(class_def, ast.ClassDef):
            continue
        docs = out[class_def.name] = {}
        for node in class_def.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                above: list[str] = []
                line = node.lineno - 1
                while line in comments:
                    above.insert(0, comments[line])
                    line -= 1
                end = node.end_lineno or node.lineno
                if end in comments:  # a comment beside the field, continued on comment lines right below it
                    beside, line = [comments[end]], end + 1
                    while line in standalone:
                        beside.append(comments[line])
                        line += 1
                    docs[node.target.id] = " ".join(beside)
                else:
                    docs[node.target.id] = " ".join(above)
    return out


def _comment_docs(cls: type) -> dict[str, str]:
    return _module_docs(inspect.getfile(cls))[cls.__name__]


def field_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """Flattened `{"section.key": doc}` for a config class, nested sections included.

    Docs are the comments beside the fields in the source, nanoGPT style, so the code and the
    `stillroom config --docs` output can never disagree.
    """
    docs: dict[str, str] = {}
    own: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # a config may extend another (distill extends the training config)
        if dataclasses.is_dataclass(base):
            own.update(_comment_docs(base))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        docs[key] = own.get(f.name, "")
        if dataclasses.is_dataclass(hints[f.name]):
            docs.update(field_docs(hints[f.name], key + "."))
    return docs


def field_types(cls: type, prefix: str = "") -> dict[str, str]:
    """Flattened `{"section.key": type name}` for a config class's values (sections themselves left out), as
    `stillroom config --docs` shows them: "int", "list of str", "'cosine' | 'wsd'", ..."""
    types_: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            types_.update(field_types(hints[f.name], f"{prefix}{f.name}."))
        else:
            own = f" or {f.metadata.get('notation', 'text')}" if "text" in f.metadata else ""
            types_[f"{prefix}{f.name}"] = _type_name(hints[f.name]) + own
    return types_


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"table of {_type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` (as read from TOML) against the annotation `tp`; return the typed value."""

    def wrong() -> ConfigError:
        shown = json.dumps(value) if isinstance(value, str | int | float | bool) else type(value).__name__
        return ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {shown}")

    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} must be a table (section), got {type(value).__name__}")
        return _build(typing.cast(type, tp), value, source, key + ".")
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise wrong()
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise wrong()
    if origin is tuple:
        (item_tp, *_rest) = get_args(tp)
        if isinstance(value, str) and _is_text(item_tp):  # one item given as itself, e.g. inputs = "data/*.jsonl"
            value = [value]
        if not isinstance(value, list | tuple):
            raise wrong()
        return tuple(_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong()
        _, val_tp = get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong()
    if tp is type(None):
        if value is None:
            return None
        raise wrong()
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _unknown_key(cls: type, key: str, prefix: str, source: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(valid)}"
    return ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")


def _from_text(field: dataclasses.Field[Any] | None, value: Any, key: str, source: str) -> Any:
    """A field may read text in a notation of its own (metadata "text": a parser, e.g. Slurm's "04:00:00" for
    minutes; "notation": its name for the docs): `value` parsed by it when it is text, else as it is."""
    parse = field.metadata.get("text") if field is not None else None
    if parse is None or not isinstance(value, str):
        return value
    try:
        return parse(value)
    except ValueError as e:
        raise ConfigError(f"{source}: {key}: {e}") from None


def _build(cls: type[T], data: Mapping[str, Any], source: str, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            raise _unknown_key(cls, key, prefix, source)
    kwargs = {key: _coerce(_from_text(fields[key], value, prefix + key, source), hints[key], prefix + key, source)
              for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # a component's own check in __post_init__ names the bare field
        raise ConfigError(f"{source}: {prefix}{e}") from None


def _field_type(cls: type, dotted: str, source: str) -> tuple[Any, dataclasses.Field[Any] | None]:
    """The annotation of a dotted key and its field (None inside a free-form table), raising the same
    unknown-key error as loading."""
    tp: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            break
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise _unknown_key(typing.cast(type, tp), part, ".".join(parts[:i]) + ("." if i else ""), source)
        field = {f.name: f for f in dataclasses.fields(tp)}[part]
        tp = hints[part]
        if i == len(parts) - 1:
            return tp, field
    if get_origin(tp) is dict:  # free-form tables such as extra sbatch parameters
        return get_args(tp)[1], None
    raise ConfigError(f"{source}: '{dotted}' goes inside a value that is not a section")


def _is_text(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return any(_is_text(a) for a in get_args(tp))
    return False


def _is_text_list(tp: Any) -> bool:
    return get_origin(tp) is tuple and _is_text(get_args(tp)[0])


def parse_override(cls: type, text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], typed value). Text fields take the raw text, and so do list-of-text fields for one
    item (`shard.inputs=data/*.jsonl`) and fields with a notation of their own (`time_min=04:00:00`); others
    parse as TOML."""
    source = f"override '{text}'"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"{source}: expected KEY=VALUE with a dotted key, e.g. resources.nodes=2")
    tp, field = _field_type(cls, key, source)
    own_notation = field is not None and "text" in field.metadata
    if (_is_text(tp) or own_notation) and not raw.startswith(('"', "'")):
        value: Any = raw
    elif _is_text_list(tp) and not raw.lstrip().startswith(("[", '"', "'")):
        value = [raw]
    else:
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {raw!r}") from None
    return key.split("."), _coerce(_from_text(field, value, key, source), tp, key, source)


def _set_nested(data: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        child = data.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{'.'.join(path)}': '{part}' is not a section")
        data = child
    data[path[-1]] = to_plain(value)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def apply_overrides(cls: type, raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of `raw` with each `a.b=c` override checked against `cls` and set."""
    data: dict[str, Any] = json.loads(json.dumps(dict(raw)))  # TOML values are all JSON-representable
    for text in overrides:
        path, value = parse_override(cls, text)
        _set_nested(data, path, value)
    return data


def build(cls: type[T], data: Mapping[str, Any], source: str) -> T:
    """Build `cls` from a raw mapping (a parsed TOML file), strictly."""
    return _build(cls, data, source)


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples -> dicts/lists of TOML-representable values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of the resolved config: equal configs, equal hashes."""
    return hashlib.sha256(json.dumps(to_plain(obj), sort_keys=True).encode()).hexdigest()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(obj: Any, docs: Mapping[str, str] = {}) -> str:
    """The resolved config as TOML, each key preceded by its doc line; tables after scalars."""
    out: list[str] = []
    sections = _section_keys(type(obj)) if dataclasses.is_dataclass(obj) else set()

    def section(data: dict[str, Any], prefix: str) -> None:
        tables = {k: v for k, v in data.items() if isinstance(v, dict) and f"{prefix}{k}" in sections}
        for key, value in data.items():
            if key in tables:
                continue
            if doc := docs.get(prefix + key):
                out.append(f"# {doc}")
            out.append(f"{json.dumps(key) if not key.isidentifier() else key} = {_toml_value(value)}")
        for key, value in tables.items():
            out.append("")
            out.append(f"[{prefix}{key}]")
            section(value, f"{prefix}{key}.")

    section(to_plain(obj), "")
    return "\n".join(out).lstrip("\n") + "\n"


def _section_keys(cls: type, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.add(prefix + f.name)
            keys |= _section_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def docs_rows(cfg: Any) -> list[tuple[str, str, str, str]]:
    """(key, type, value as TOML/JSON text, meaning) for every value of a resolved config, in declaration order."""
    values, types_ = _flat(to_plain(cfg)), field_types(type(cfg))
    return [(key, types_[key], json.dumps(values[key]), doc) for key, doc in field_docs(type(cfg)).items()
            if key in types_]


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every dotted key of a nested mapping with its value, tables included as themselves."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        out[f"{prefix}{key}"] = value
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
    return out


def render_docs(cfg: Any, fmt: str, width: int) -> str:
    """`stillroom config --docs` as text: "plain" (a key, its value and type a line, its meaning wrapped below, to
    `width` columns) or "markdown" (a table)."""
    import textwrap

    rows, out = docs_rows(cfg), []
    if fmt == "markdown":
        out.append("| key | type | value | meaning |\n|---|---|---|---|")
        out += ["| " + " | ".join(f"`{c}`" if i in (0, 2) else c.replace("|", "\\|") for i, c in enumerate(row))
                + " |" for row in rows]
    else:
        for key, type_name, value, doc in rows:
            out.append(textwrap.fill(f"{key} = {value}  ({type_name})", width, subsequent_indent=" " * 8,
                                     break_long_words=False, break_on_hyphens=False))
            if doc:
                out.append(textwrap.fill(doc, width, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(out) + "\n"
