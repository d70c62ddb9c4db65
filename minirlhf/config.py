"""Configs: dataclasses whose fields carry their help text, filled from YAML plus `key=value` overrides.

`configs/rlhf.yaml` has one section per stage; `load_stage_config(StageConfig, path, "sft", overrides)`
reads a section, applies overrides (values parsed as YAML, so `lr=1e-4` is a float and `resume=true` a
bool), checks types and ranges, and rejects unknown keys with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem the user can fix: unknown key, wrong type, out-of-range value."""


def field(default: Any, help: str, **kwargs) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with help text (shown by `minirlhf <stage> --help`)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    if dataclasses.is_dataclass(default):  # a nested section, e.g. `lora`
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default),
                                 metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['lr=1e-4', 'resume=true', 'lora.r=8'] -> {'lr': 0.0001, 'resume': True, 'lora': {'r': 8}}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: invalid YAML value ({_yaml_problem(e)})") from None
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A one-line description of a YAML error (PyYAML's own message spans several lines)."""
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, merging nested sections key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def _show(value: Any) -> str:
    """A short repr for error messages: a YAML alias bomb (a list of lists of ... ) must not be expanded."""
    return _SHORT.repr(value)


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(name, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{name}: {_show(value)} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of {annotation.__name__} options, got {_show(value)}")
        return build_config(annotation, value, where=name)
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise ConfigError(f"{name}: expected a {origin.__name__}, got {_show(value)}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected float, got {_show(value)}") from None
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{name}: expected {annotation.__name__}, got {_show(value)}")
        return value
    return value


def _resolve_aliases(fields: dict[str, dataclasses.Field], values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` with each field's `alias` (e.g. TRL's `beta` for `kl_coef`) renamed to the field; an alias that is
    a field of its own in this config (online DPO's `beta`) is that field, not an alias."""
    values = dict(values)
    for name, f in fields.items():
        alias = f.metadata.get("alias")
        if alias and alias in values and alias not in fields:
            if name in values:
                raise ConfigError(f"{where}: set {name} or its alias {alias}, not both")
            values[name] = values.pop(alias)
    return values


def build_config(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Instantiate dataclass `cls` from `values`, checking keys, types and declared ranges."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = _resolve_aliases(fields, values, where)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    checked = {}
    for key, value in values.items():
        value = _check_type(f"{where}.{key}", value, hints[key])
        meta = fields[key].metadata
        # NaN and inf pass every range check (`nan < min` is false), so they are refused here, by name.
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}.{key}: {value!r} is not a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise ConfigError(f"{where}.{key}: {value} does not fit in a signed 64-bit integer")
        if value is not None and "min" in meta and value < meta["min"]:
            raise ConfigError(f"{where}.{key}: {value!r} is below the minimum {meta['min']}")
        if value is not None and "max" in meta and value > meta["max"]:
            raise ConfigError(f"{where}.{key}: {value!r} is above the maximum {meta['max']}")
        if value is not None and "gt" in meta and value <= meta["gt"]:
            raise ConfigError(f"{where}.{key}: {value!r} must be greater than {meta['gt']}")
        if value is not None and "lt" in meta and value >= meta["lt"]:
            raise ConfigError(f"{where}.{key}: {value!r} must be less than {meta['lt']}")
        checked[key] = value
    return cls(**checked)


def load_stage_config(cls: type[T], path: str | Path | None, stage: str, overrides: dict[str, Any]) -> T:
    """Read section `stage` of the YAML at `path` (if any), apply overrides, build `cls`."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({_yaml_problem(e)})") from None
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: expected a mapping of stage sections")
        section = document.get(stage) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section {stage!r} must be a mapping")
        values.update(section)
    return build_config(cls, _merge(values, overrides), where=stage)


def describe(cls: type) -> str:
    """One line per field: name, default, help."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            lines += [f"  {f.name}.{line.strip()}" for line in describe(type(default)).splitlines()]
        else:
            alias = f" (alias: {f.metadata['alias']})" if f.metadata.get("alias") else ""
            lines.append(f"  {f.name} = {default!r}  # {f.metadata.get('help', '')}{alias}")
    return "\n".join(lines)
