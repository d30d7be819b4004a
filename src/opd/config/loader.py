"""One flat, typed config per run: dataclass defaults < preset < YAML file < ``key=value``.

Generic over any ``@dataclass`` whose fields have simple types: ``int``, ``float``,
``bool``, ``str``, ``Literal[...]``, ``list[int|float|str]``, and any of these ``| None``.
Help text comes from ``field(metadata={"help": ...})``; cross-field checks go in the
dataclass's ``__post_init__`` (raise ``ValueError``; it is reported as a :class:`ConfigError`).

Parsing of text (``key=value`` overrides, and strings met in YAML where a number is
expected, e.g. PyYAML reads ``3e-4`` as a string):

- ``bool``: ``true/false/yes/no/1/0``, any case.
- ``int``: ``12``, ``1_000``, or scientific notation when exactly integral
  (``1e3`` -> 1000; ``1.5`` and ``1e-3`` are errors).
- ``float``: anything ``float()`` accepts (``3e-4``, ``inf``).
- ``X | None``: ``none`` or ``null`` (any case) in an override; unquoted ``none``,
  ``null`` or ``~`` in YAML. For an optional key ``none`` means None, even for
  ``str | None``; only a quoted YAML ``'none'`` is the text (``save_config`` quotes it).
  For a key that is not optional, ``none`` is just text (``Literal["std", "none"]``).
- lists: ``a,b,c`` or YAML flow syntax ``[a, b]``; ``""`` or ``[]`` is the empty list.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = ["ConfigError", "load_config", "config_to_dict", "save_config", "describe_config"]

T = TypeVar("T")
_SCALARS = (int, float, bool, str)
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}
_NONE = {"none", "null"}
_A_TYPE = {int: "an int", float: "a float", bool: "a bool (true/false/yes/no/1/0)", str: "a string"}


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the fix."""


class _Bad(Exception):
    """Internal: a value does not fit its type (optional detail in args[0])."""


# ---------------------------------------------------------------- types


def _optional_inner(tp: Any) -> Any | None:
    """``X`` for ``X | None`` / ``Optional[X]``, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _check_supported(name: str, tp: Any) -> None:
    """Raise TypeError for field types this module cannot parse (a programming error)."""
    inner = _optional_inner(tp)
    base = inner if inner is not None else tp
    origin, args = typing.get_origin(base), typing.get_args(base)
    if base in _SCALARS:
        return
    if origin is Literal and all(isinstance(a, _SCALARS) for a in args):
        return
    if origin is list and len(args) == 1 and args[0] in (int, float, str):
        return
    raise TypeError(f"config field {name!r} has unsupported type {tp!r}")


def _type_name(tp: Any) -> str:
    """Short display name: ``int``, ``float | None``, ``'sft'|'grpo'``, ``list[int]``."""
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} | None"
    if typing.get_origin(tp) is Literal:
        return "|".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{typing.get_args(tp)[0].__name__}]"
    return tp.__name__


def _expectation(tp: Any) -> str:
    """What an error says the key wants: ``expects a float`` / ``must be one of ...``."""
    inner = _optional_inner(tp)
    base = inner if inner is not None else tp
    if typing.get_origin(base) is Literal:
        choices = ", ".join(repr(a) for a in typing.get_args(base))
        return f"must be one of {choices}" + (", or none" if inner is not None else "")
    if typing.get_origin(base) is list:
        elem = typing.get_args(base)[0]
        example = {int: "1,2", float: "0.1,0.2", str: "a,b"}[elem]
        text = f"expects a list of {elem.__name__} (e.g. '{example}' or '[{example}]')"
    else:
        text = "expects " + _A_TYPE[base]
    return text + (" or none" if inner is not None else "")


# ---------------------------------------------------------------- parsing


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _Bad()


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Bad()
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            number = Decimal(value.strip().replace("_", ""))
        except InvalidOperation:
            raise _Bad() from None
        if number.is_finite() and number == number.to_integral_value():
            return int(number)
        raise _Bad("not a whole number")
    raise _Bad()


def _parse_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _Bad() from None
    raise _Bad()


def _parse_str(value: Any) -> str:
    if isinstance(value, str):
        return str(value)  # a plain str, also for a _NoneWord
    raise _Bad("quote it in YAML to make it a string")


def _parse_literal(tp: Any, value: Any) -> Any:
    for choice in typing.get_args(tp):
        if type(value) is type(choice) and value == choice:
            return choice
        if isinstance(value, str) and not isinstance(choice, str):
            try:
                if _parse_scalar(type(choice), value) == choice:
                    return choice
            except _Bad:
                pass
    raise _Bad()


def _parse_list(tp: Any, value: Any) -> list:
    elem = typing.get_args(tp)[0]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                raise _Bad("malformed [...] list") from None
        else:
            value = [item.strip() for item in text.split(",")] if text else []
    if not isinstance(value, (list, tuple)):
        raise _Bad()
    out = []
    for i, item in enumerate(value):
        try:
            out.append(_parse_scalar(elem, item))
        except _Bad:
            raise _Bad(f"item {i} is {item!r}, not {_A_TYPE[elem]}") from None
    return out


def _parse_scalar(tp: Any, value: Any) -> Any:
    parser = {bool: _parse_bool, int: _parse_int, float: _parse_float, str: _parse_str}
    return parser[tp](value)


def _parse(tp: Any, value: Any, raw: bool) -> Any:
    """Coerce ``value`` to ``tp``; ``raw`` marks command-line text (``none`` means None)."""
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or isinstance(value, _NoneWord):
            return None
        is_none_word = isinstance(value, str) and value.strip().lower() in _NONE
        if is_none_word and (raw or not _takes_strings(inner)):
            return None
        return _parse(inner, value, raw)
    if isinstance(value, _NoneWord):
        value = str(value)
    if value is None:
        raise _Bad("this key is not optional")
    if typing.get_origin(tp) is Literal:
        return _parse_literal(tp, value.strip() if raw else value)
    if typing.get_origin(tp) is list:
        return _parse_list(tp, value)
    return _parse_scalar(tp, value)


def _takes_strings(tp: Any) -> bool:
    """Whether a YAML string can be a legitimate value of ``tp`` (so 'none' stays text)."""
    if typing.get_origin(tp) is list:
        return False
    return tp is str or typing.get_origin(tp) is Literal


# ---------------------------------------------------------------- loading


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """The init fields of a dataclass with their resolved, checked types."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass class, got {cls!r}")
    hints = typing.get_type_hints(cls, include_extras=False)
    out = {}
    for f in dataclasses.fields(cls):
        if f.init:
            _check_supported(f.name, hints[f.name])
            out[f.name] = (f, hints[f.name])
    return out


def _similarity(a: str, b: str) -> float:
    """How alike two keys are: edit similarity, shared ``_`` words, or one prefixing the other."""
    ratio = difflib.SequenceMatcher(None, a, b).ratio()
    words_a, words_b = set(a.split("_")), set(b.split("_"))
    jaccard = len(words_a & words_b) / len(words_a | words_b)
    short, long = sorted((a, b), key=len)
    affix = len(short) >= 2 and (long.startswith(short) or long.endswith("_" + short))
    return max(ratio, jaccard, 0.8 if affix else 0.0)


def _unknown_key(key: str, known: list[str]) -> str:
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
    return msg + f" (known keys: {', '.join(known)})"


def _set(values: dict, fields: dict, key: Any, value: Any, raw: bool, source: str) -> None:
    """Validate ``key``, parse ``value`` and store it in ``values``."""
    if not isinstance(key, str) or key not in fields:
        raise ConfigError(f"{_unknown_key(str(key), list(fields))} [{source}]")
    if isinstance(value, dict):
        raise ConfigError(
            f"config key {key!r} has a nested mapping; the config is flat, "
            f"give {key!r} a single value [{source}]"
        )
    tp = fields[key][1]
    try:
        values[key] = _parse(tp, value, raw)
    except _Bad as bad:
        detail = f" ({bad.args[0]})" if bad.args else ""
        raise ConfigError(
            f"config key {key!r} {_expectation(tp)}, got {value!r}{detail} [{source}]"
        ) from None


_NONE_WORD = re.compile(r"^(?:none|None|NONE)$")
_NONE_TAG = "!opd_none_word"


class _NoneWord(str):
    """An unquoted ``none`` in YAML: None for an optional key, the text 'none' otherwise."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes the text 'none' (so it is not read back as a _NoneWord)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads unquoted ``none`` as :class:`_NoneWord`; rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"duplicate config key {key!r} (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


for _cls in (_Dumper, _Loader):
    _cls.add_implicit_resolver(_NONE_TAG, _NONE_WORD, list("nN"))
_Loader.add_constructor(_NONE_TAG, lambda loader, node: _NoneWord(node.value))


def _read_yaml(path: str | Path) -> dict:
    """The flat mapping in a YAML file (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except ConfigError as e:
        raise ConfigError(f"{e} in config file '{path}'") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must be a flat mapping of 'key: value' lines, "
            f"got a {type(data).__name__}"
        )
    return data


def _split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"malformed override {text!r}: expected key=value, e.g. 'lr=3e-4'")
    return key.strip(), value


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: typing.Iterable[str] = (),
    base: dict | None = None,
) -> T:
    """Build ``cls`` from its defaults, then ``base``, the YAML ``path``, ``overrides``.

    Later sources win; among overrides the last one wins. Raises :class:`ConfigError`.
    """
    fields, values = _fields(cls), {}
    for key, value in (base or {}).items():
        _set(values, fields, key, value, raw=False, source="preset")
    if path is not None:
        for key, value in _read_yaml(path).items():
            _set(values, fields, key, value, raw=False, source=f"file '{path}'")
    for text in [overrides] if isinstance(overrides, str) else overrides:
        key, value = _split_override(text)
        _set(values, fields, key, value, raw=True, source=f"override {text!r}")
    return _construct(cls, fields, values)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _construct(cls: type[T], fields: dict, values: dict) -> T:
    for name, (f, _) in fields.items():
        if _is_required(f) and name not in values:
            raise ConfigError(
                f"config key {name!r} is required; set it in the YAML file or as {name}=..."
            )
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"invalid config: {e}") from e


# ---------------------------------------------------------------- output


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The init fields of a config instance as a plain dict (lists copied)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass instance, got {cfg!r}")
    out = {}
    for f in dataclasses.fields(cfg):
        if f.init:
            value = getattr(cfg, f.name)
            out[f.name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML; ``load_config(type(cfg), path)`` gives it back exactly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(
        config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=None,
        allow_unicode=True,
    )
    path.write_text(text)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def describe_config(cls: type) -> str:
    """A ``--help``-like table: key, type, default, help text."""
    rows = [("key", "type", "default", "help")]
    for name, (f, tp) in _fields(cls).items():
        rows.append((name, _type_name(tp), _default_text(f), f.metadata.get("help", "")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:3], widths)]
        lines.append("  ".join(cells + [row[3]]).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths + [4]))
    return "\n".join(lines)
