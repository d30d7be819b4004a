"""One flat, typed config per run: model defaults < preset < YAML file < ``key=value``.

A config is a pydantic v2 model derived from :class:`FlatConfig`: unknown keys are
refused, floats must be finite, and types, ranges (``Field(ge=..., gt=...)``) and help
texts live on the fields; cross-field checks are ``model_validator``\\ s. This module adds
what a command line needs on top of pydantic: YAML files and ``key=value`` text, the
source of every bad value in its message, suggestions for unknown keys, and the table
behind ``opd config``.

Text (``key=value`` overrides, a YAML string where a number is expected) is read by the
field's type: booleans ``true/false/yes/no/on/off/1/0``; ints ``12``, ``1_000``, or
scientific notation when exactly integral (``1e3``); floats anything ``float()`` reads
that is finite; ``none`` or ``null`` (any case) is None for an optional key.
"""

from __future__ import annotations

import difflib
import types
import typing
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticUndefined

from opd.errors import UserError

__all__ = ["ConfigError", "FlatConfig", "load_config", "config_to_dict", "save_config", "describe_config", "with_changes"]

T = TypeVar("T", bound=BaseModel)
_NONE_WORDS = {"none", "null"}


class ConfigError(UserError):
    """A config key or value is wrong; the message names the key, its source and the fix."""


def _optional_inner(tp: Any) -> Any | None:
    """``X`` for ``X | None``, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 < len(typing.get_args(tp)):
            return args[0]
    return None


def _integral(text: str) -> int | str:
    """``'1e3'`` -> 1000; anything else is returned for pydantic to judge."""
    try:
        number = Decimal(text.strip().replace("_", ""))
    except InvalidOperation:
        return text
    return int(number) if number.is_finite() and number == number.to_integral_value() else text


class FlatConfig(BaseModel):
    """Base of a flat run config: unknown keys refused, floats finite, values re-checked
    on assignment."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)

    def __setattr__(self, name: str, value: Any) -> None:
        """Assignment checks the whole config first, so a refused value changes nothing."""
        if name in type(self).model_fields:
            type(self).model_validate({**self.model_dump(), name: value})
        super().__setattr__(name, value)

    @field_validator("*", mode="before")
    @classmethod
    def _text(cls, value: Any, info) -> Any:
        """``none`` for an optional key, integral scientific notation for an int, and no
        YAML bool where a number is expected (``steps: yes`` is refused, not 1)."""
        annotation = cls.model_fields[info.field_name].annotation
        inner = _optional_inner(annotation)
        if isinstance(value, bool) and (inner or annotation) in (int, float):
            return str(value).lower()
        if not isinstance(value, str):
            return value
        if inner is not None and value.strip().lower() in _NONE_WORDS:
            return None
        return _integral(value) if (inner or annotation) is int else value


# ---------------------------------------------------------------- errors


def _similarity(a: str, b: str) -> float:
    """How alike two keys are: edit similarity, shared ``_`` words, or one prefixing the other."""
    ratio = difflib.SequenceMatcher(None, a, b).ratio()
    words_a, words_b = set(a.split("_")), set(b.split("_"))
    jaccard = len(words_a & words_b) / len(words_a | words_b)
    short, long = sorted((a, b), key=len)
    affix = len(short) >= 2 and (long.startswith(short) or long.endswith("_" + short))
    return max(ratio, jaccard, 0.8 if affix else 0.0)


def _unknown_key(key: str, known: list[str], source: str) -> ConfigError:
    msg = f"unknown config key {key!r}"
    typed = key.lstrip("-").replace("-", "_").replace(".", "_")
    scored = sorted(((_similarity(typed, k), k) for k in known), reverse=True)
    guess = [k for score, k in scored[:3] if score >= 0.6]
    if guess:
        msg += "; did you mean " + " or ".join(repr(g) for g in guess) + "?"
    if key.startswith("-"):
        msg += " (write overrides as key=value, without dashes)"
    if "." in key:
        msg += " (the config is flat: keys have no dots)"
    return ConfigError(f"{msg} [{source}] (`opd config` lists every key)")


_WANTS = {
    "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}", "less_than_equal": "must be <= {le}",
    "finite_number": "must be a finite number (not nan or inf)", "literal_error": "must be one of {expected}",
    "int_parsing": "expects an int", "int_from_float": "expects a whole number", "int_type": "expects an int",
    "float_parsing": "expects a float", "float_type": "expects a float",
    "bool_parsing": "expects a bool (true/false/yes/no/on/off/1/0)", "bool_type": "expects a bool",
    "string_type": "expects a string (quote it in YAML)", "string_too_short": "must not be empty",
}


def _wants(error: dict) -> str:
    """What a key must be, from a pydantic error: ``must be > 0``, ``expects an int``."""
    template = _WANTS.get(error["type"])
    if template is None:
        return error["msg"][0].lower() + error["msg"][1:]
    ctx = {k: f"{v:g}" if isinstance(v, float) else v for k, v in error.get("ctx", {}).items()}
    return template.format(**ctx)


def _explain(err: ValidationError, sources: dict[str, str]) -> ConfigError:
    """One line per bad value: the key, what it must be, what it got, where it came from."""
    lines = []
    for e in err.errors():
        if not e["loc"]:
            lines.append(f"invalid config: {e['msg'].removeprefix('Value error, ')}")
            continue
        key = str(e["loc"][0])
        if e["type"] == "missing":
            lines.append(f"config key {key!r} is required; set it in a YAML file or as {key}=...")
            continue
        lines.append(f"config key {key!r} {_wants(e)}, got {e['input']!r} [{sources.get(key, 'default')}]")
    return ConfigError("; ".join(lines))


# ---------------------------------------------------------------- reading


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(f"duplicate config key {key!r} (line {key_node.start_mark.line + 1})")
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str | Path) -> dict:
    """The flat mapping in a YAML file (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except ConfigError as e:
        raise ConfigError(f"{e} in config file '{path}'") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {' '.join(str(e).split())}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must be a flat mapping of 'key: value' lines, got a {type(data).__name__}")
    return data or {}


def _split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"malformed override {text!r}: expected key=value, e.g. 'lr=3e-4'")
    return key.strip(), value.strip()


def _gather(cls: type[BaseModel], path, overrides, base) -> tuple[dict, dict]:
    """(values, the source of each) from ``base``, the YAML ``path`` and ``overrides``."""
    known = list(cls.model_fields)
    layers = [(base or {}, "preset")]
    if path is not None:
        layers.append((_read_yaml(path), f"file '{path}'"))
    texts = [overrides] if isinstance(overrides, str) else list(overrides)
    layers += [(dict([_split_override(text)]), f"override {text!r}") for text in texts]
    values, sources = {}, {}
    for mapping, source in layers:
        for key, value in mapping.items():
            if not isinstance(key, str) or key not in known:
                raise _unknown_key(str(key), known, source)
            values[key], sources[key] = value, source
    return values, sources


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (), base: dict | None = None) -> T:
    """Build ``cls`` from its defaults, then ``base``, the YAML ``path``, ``overrides``
    (later wins; among overrides the last one). Raises :class:`ConfigError`."""
    values, sources = _gather(cls, path, overrides, base)
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        raise _explain(err, sources) from None


def with_changes(cfg: T, **changes) -> T:
    """A validated copy of ``cfg`` with ``changes`` applied."""
    try:
        return type(cfg).model_validate({**cfg.model_dump(), **changes})
    except ValidationError as err:
        raise _explain(err, {k: "changed in code" for k in changes}) from None


# ---------------------------------------------------------------- output


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """The config's values as a plain dict."""
    return cfg.model_dump()


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write ``cfg`` as YAML; ``load_config(type(cfg), path)`` gives it back exactly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False, allow_unicode=True), encoding="utf-8")


def _type_name(tp: Any) -> str:
    """Short display name: ``int``, ``float | None``, ``'sft'|'grpo'``."""
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} | None"
    if typing.get_origin(tp) is Literal:
        choices = [repr(a) for a in typing.get_args(tp)]
        return "|".join(choices) if len(choices) <= 6 else f"{'|'.join(choices[:2])}|... ({len(choices)} names)"
    return getattr(tp, "__name__", str(tp))


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _range(field) -> str:
    """The field's bounds as text, e.g. ``[> 0, <= 1]``."""
    parts = [f"{sign} {getattr(m, name)}" for m in field.metadata for name, sign in _BOUNDS.items() if hasattr(m, name)]
    return f" [{', '.join(parts)}]" if parts else ""


def describe_config(cls: type[BaseModel]) -> str:
    """A ``--help``-like table: key, type, default, help text and range."""
    rows = [("key", "type", "default", "help")]
    for name, field in cls.model_fields.items():
        default = "(required)" if field.default is PydanticUndefined else repr(field.default)
        rows.append((name, _type_name(field.annotation), default, (field.description or "") + _range(field)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join([cell.ljust(w) for cell, w in zip(row[:3], widths)] + [row[3]]).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths + [4]))
    return "\n".join(lines)
