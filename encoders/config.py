"""YAML job configs as typed dataclasses, with ``key=value`` overrides from the command line.

A config file is a nested mapping whose keys must match the fields of a (nested)
dataclass; a misspelt key is an error that names it and lists the valid keys. Numbers
must be finite; a field declared with :func:`bounded` is range-checked too, and the
error names the key, the value and the allowed range.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Job:
    ...     epochs: int = 1
    ...     lr: float = 0.1
    >>> load_config(Job, None, ["lr=0.01", "epochs=3"])
    Job(epochs=3, lr=0.01)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from encoders.errors import RFIError

T = TypeVar("T")


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader where only ``true``/``false`` are booleans (YAML 1.2), not ``yes``/``no``/``on``/``off``."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def bounded(default: Any, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Any:
    """A dataclass field whose value (or each item of a list) must lie in a range.

    Args:
        default: the field's default.
        low, high: the bounds (``None``: unbounded); ``high`` is inclusive.
        low_open: exclude ``low`` itself (e.g. a learning rate: ``bounded(0.1, 0, low_open=True)``).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Job:
        ...     lr: float = bounded(0.1, 0, low_open=True)
        >>> load_config(Job, None, ["lr=-1"])
        Traceback (most recent call last):
        encoders.errors.RFIError: config key 'lr' in the command-line overrides must be > 0, got -1.0
    """
    return dataclasses.field(default=default, metadata={"range": (low, high, low_open)})


class _Source:
    """Where config values came from: the YAML file, except the keys given as overrides."""

    def __init__(self, path: str | os.PathLike | None, overridden: set[str]):
        self.path, self.overridden = path, overridden

    def of(self, name: str) -> str:
        if name in self.overridden or self.path is None:
            return "the command-line overrides"
        return str(self.path)


def _src(source: "_Source | str", name: str) -> str:
    return source.of(name) if isinstance(source, _Source) else source


def _check_range(value: Any, spec: tuple[float | None, float | None, bool], name: str, source: "_Source | str") -> None:
    low, high, low_open = spec
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v is None or not isinstance(v, (int, float)):
            continue
        bad_low = low is not None and (v <= low if low_open else v < low)
        bad_high = high is not None and v > high
        if bad_low or bad_high:
            if low is not None and high is not None:
                want = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            elif low is not None:
                want = f"{'>' if low_open else '>='} {low:g}"
            else:
                want = f"<= {high:g}"
            raise RFIError(f"config key '{name}' in {_src(source, name)} must be {want}, got {value!r}")


def _build(cls: type, data: dict[str, Any], where: str, source: "_Source | str") -> Any:
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # classes defined in a local scope (doctests): annotations are real types
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}{key}"
        if key not in fields:
            raise RFIError(f"unknown config key '{name}' in {_src(source, name)} "
                           f"(valid keys{' under ' + where[:-1] if where else ''}: {', '.join(fields)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise RFIError(f"config key '{name}' in {_src(source, name)} must be a mapping, got {value!r}")
            value = _build(hint, value, f"{name}.", source)
        else:
            value = _coerce(value, hint, name, source)
            if "range" in fields[key].metadata:
                _check_range(value, fields[key].metadata["range"], name, source)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RFIError(f"bad config in {_src(source, where[:-1])}: {e}") from None


def _coerce(value: Any, hint: Any, name: str, source: "_Source | str") -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    if origin is typing.Union:  # Optional[X] and X | None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name, source)
            except RFIError:
                pass
        raise RFIError(f"config key '{name}' in {_src(source, name)}: {value!r} is not a valid {hint}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_coerce(v, inner, name, source) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is Any or origin is typing.Literal:
        if origin is typing.Literal and value not in args:
            raise RFIError(f"config key '{name}' in {_src(source, name)}: {value!r} is not one of {list(args)}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RFIError(f"config key '{name}' in {_src(source, name)} must be true or false, got {value!r}")
    if hint in (int, float, str):
        if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise RFIError(f"config key '{name}' in {_src(source, name)} must be a finite number, got {value!r}")
            return float(value)
        if hint is str and isinstance(value, (int, float)):
            return str(value)
        if isinstance(value, hint) and not isinstance(value, bool):
            return value
        raise RFIError(f"config key '{name}' in {_src(source, name)} must be {hint.__name__}, got {value!r}")
    return value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RFIError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error naming the file when it is bad."""
    path = Path(path)
    if not path.is_file():
        raise RFIError(f"config file not found: {path}")
    try:
        data = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RFIError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RFIError(f"{path} must hold a mapping of config keys")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Build the dataclass ``cls`` from a YAML file and ``key=value`` overrides.

    Args:
        cls: the job's config dataclass (fields may be nested dataclasses).
        path: YAML file, or ``None`` for the defaults.
        overrides: strings ``a.b=value``; values are parsed as YAML (``3``, ``0.1``, ``true``, ``[1, 2]``).

    Raises:
        RFIError: missing file, bad YAML, unknown key, or a value of the wrong type.
    """
    data = read_yaml(path) if path is not None else {}
    for item in overrides:
        if "=" not in item:
            raise RFIError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), _load_yaml(raw) if raw else "")
    overridden = {item.split("=", 1)[0].strip() for item in overrides}
    return _build(cls, data, "", _Source(path, overridden))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict (safe to store in a ``weights_only`` checkpoint)."""
    return dataclasses.asdict(cfg)


def add_job_arguments(parser: argparse.ArgumentParser, config: str | None, overrides_example: str,
                      out_help: str, resume_help: str = "continue the run in the output folder") -> None:
    """The arguments every training command shares: ``--config``, ``key=value`` overrides, ``--resume``, ``--out``.

    Args:
        parser: the command's parser.
        config: the default config file, or ``None`` to make ``--config`` required.
        overrides_example: an example of overrides for the help text.
        out_help: what ``--out`` names and its default.
        resume_help: what ``--resume`` does.
    """
    if config is None:
        parser.add_argument("--config", required=True, help="YAML config (the shipped ones are under configs/)")
    else:
        parser.add_argument("--config", default=config, help=f"YAML config (default: {config})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {overrides_example}")
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--out", help=out_help)
