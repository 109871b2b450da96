"""YAML job configs as typed dataclasses, with ``key=value`` overrides from the command line.

A config file is a nested mapping whose keys must match the fields of a (nested)
dataclass; a misspelt key is an error that names it and lists the valid keys. The rules a
config class declares, each in one way: a choice is a ``Literal[...]`` type, a numeric range
a :func:`bounded` field, and a rule across keys the class's ``check()`` method (raising
:class:`~encoders.core.errors.RFIError`); numbers must be finite. :func:`load_config` checks
them all as it builds a config, :func:`check_config` a config built or changed in code (such
as a command's flags), and each error names the key, the value and what is allowed.

Defaults are written in one place, the shipped YAML under ``configs/`` (installed as the
``configs`` package): :func:`yaml_dataclass` makes a dataclass whose field defaults are read
from its shipped file, and :func:`load_config` fills every key a user's file leaves out from
that file. Configs are composed as data: :func:`merge` layers mappings (dotted keys allowed),
and :func:`parse_overrides` parses command-line ``key=value`` strings once, into a mapping of
dotted keys that :func:`load_config` takes as they are.
A path ``configs/...`` that does not exist relative to the working directory is read from
the installed copy (:func:`config_path`), so the documented paths work from any folder.

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

import copy
import dataclasses
import functools
import importlib.resources
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from encoders.core.errors import RFIError

T = TypeVar("T")


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when installed
    """YAML's safe loader where only ``true``/``false`` are booleans (YAML 1.2), not ``yes``/``no``/``on``/``off``."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def bounded(*, low: float | None = None, high: float | None = None, low_open: bool = False) -> Any:
    """A config field whose value (or each item of a list) must lie in a range; its default is in the YAML.

    The one way to declare a numeric range: :func:`load_config` and :func:`check_config` check it and
    the error names the key, the value and the range. (Choices are a ``Literal[...]`` type; a rule
    across keys is the class's ``check()`` method, which both call after building the class.)

    Args:
        low, high: the bounds (``None``: unbounded); ``high`` is inclusive.
        low_open: exclude ``low`` itself (e.g. a learning rate: ``bounded(low=0, low_open=True)``).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Job:
        ...     lr: float = bounded(low=0, low_open=True)
        >>> check_config(Job(lr=-1))
        Traceback (most recent call last):
        encoders.core.errors.RFIError: config key 'lr' in the config must be > 0, got -1.0
    """
    return dataclasses.field(metadata={"range": (low, high, low_open)})


def value_range(
    value: float | Sequence[float], key: str, low: float | None = None, high: float | None = None
) -> tuple[float, float]:
    """A range given as one number or ``[lo, hi]``: ``25`` -> ``(25.0, 25.0)``; checks ``low <= lo <= hi <= high``.

    Args:
        value: one number, or a pair ``[lo, hi]``.
        key: the config key or flag, for the error message (e.g. ``"noise.sigma"``).
        low, high: the bounds (``None``: unbounded).

    Returns:
        ``(lo, hi)`` as floats.

    Raises:
        RFIError: not one or two numbers, outside the bounds, or ``lo > hi``.

    Example:
        >>> value_range([5, 50], "noise.sigma", low=0)
        (5.0, 50.0)
        >>> value_range(2, "alpha", 0, 1)
        Traceback (most recent call last):
        encoders.core.errors.RFIError: alpha must be one number or a range [lo, hi] with 0 <= lo <= hi <= 1, got 2
    """
    values = [value] if isinstance(value, (int, float)) else list(value)
    if len(values) == 1:
        values = values * 2
    rule = " <= ".join(([] if low is None else [f"{low:g}"]) + ["lo", "hi"] + ([] if high is None else [f"{high:g}"]))
    numbers = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    lo, hi = (float(values[0]), float(values[1])) if numbers else (math.nan, math.nan)
    if not (numbers and lo <= hi and (low is None or low <= lo) and (high is None or hi <= high)):
        raise RFIError(f"{key} must be one number or a range [lo, hi] with {rule}, got {value!r}")
    return lo, hi


class _Source:
    """Where config values came from: the YAML file, except the keys given as overrides."""

    def __init__(self, path: str | os.PathLike | None, overridden: set[str]):
        self.path, self.overridden = path, overridden

    def of(self, name: str) -> str:
        if self.path is None or any(name == k or name.startswith(f"{k}.") for k in self.overridden):
            return "the command-line overrides"
        return str(self.path)


FLAGS = "command-line flags"  # the source of check_config(..., source=FLAGS): keys are named as flags


def _src(source: _Source | str, name: str) -> str:
    return source.of(name) if isinstance(source, _Source) else source


def _key(source: _Source | str, name: str) -> str:
    """How an error names a key: ``config key 'a.b' in FILE``, or ``--batch-size`` for command-line flags."""
    if source == FLAGS:
        return "--" + name.replace("_", "-")
    return f"config key '{name}' in {_src(source, name)}"


def _check_range(value: Any, spec: tuple[float | None, float | None, bool], name: str, source: _Source | str) -> None:
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
            raise RFIError(f"{_key(source, name)} must be {want}, got {value!r}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _build(
    cls: type, data: dict[str, Any], where: str, source: _Source | str, base: Any = None, rules: bool = True
) -> Any:
    """``cls`` from ``data``; keys ``data`` leaves out come from ``base`` (an instance), else the field defaults.

    A section (a dataclass field) given in ``data`` is built the same way on top of the value
    it replaces, so a partial section keeps the other keys; any other value is replaced whole.
    ``rules``: run each section's ``check()`` (rules across keys; not on a file that overrides
    will still change).
    """
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # classes defined in a local scope (doctests): annotations are real types
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}{key}"
        if key not in fields:
            raise RFIError(
                f"unknown config key '{name}' in {_src(source, name)} "
                f"(valid keys{' under ' + where[:-1] if where else ''}: {', '.join(fields)})"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise RFIError(f"{_key(source, name)} must be a mapping, got {value!r}")
            under = getattr(base, key) if base is not None else _field_default(fields[key])
            value = _build(hint, value, f"{name}.", source, under, rules)
        else:
            value = _coerce(value, hint, name, source)
            if "range" in fields[key].metadata:
                _check_range(value, fields[key].metadata["range"], name, source)
        kwargs[key] = value
    if base is not None:
        kwargs = {name: copy.deepcopy(getattr(base, name)) for name in fields if name not in kwargs} | kwargs
    try:
        cfg = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RFIError(f"bad config in {_src(source, where[:-1])}: {e}") from None
    if rules and callable(getattr(cfg, "check", None)):  # the class's rules across keys
        try:
            cfg.check()
        except RFIError as e:
            raise RFIError(f"{e} (in {_src(source, where[:-1])})") from None
    return cfg


def _coerce(value: Any, hint: Any, name: str, source: _Source | str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):  # Optional[X] and X | None
        arms = [arg for arg in args if arg is not type(None)]
        for arg in arms:
            try:
                return _coerce(value, arg, name, source)
            except RFIError as e:
                error = e
        if len(arms) == 1:  # X | None: X's own message
            raise RFIError(f"{error}{' (or null)' if type(None) in args else ''}") from None
        raise RFIError(f"{_key(source, name)}: {value!r} is not a valid {hint}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_coerce(v, inner, name, source) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is Any or origin is typing.Literal:
        if origin is typing.Literal and value not in args:
            raise RFIError(f"{_key(source, name)}: {value!r} is not one of {list(args)}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RFIError(f"{_key(source, name)} must be true or false, got {value!r}")
    if hint in (int, float, str):
        if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise RFIError(f"{_key(source, name)} must be a finite number, got {value!r}")
            return float(value)
        if hint is str and isinstance(value, (int, float)):
            return str(value)
        if isinstance(value, hint) and not isinstance(value, bool):
            return value
        raise RFIError(f"{_key(source, name)} must be {hint.__name__}, got {value!r}")
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any, dotted: bool = True, into: bool = True) -> None:
    """``data[a][b] = value`` for ``key = "a.b"`` (when ``dotted``); a mapping ``value`` is merged into one
    there when ``into``, else replaces it.

    Keys inside a mapping ``value`` are taken as they are (``per_layer: {layer1: {decoder.channels: 32}}``
    keeps its dotted key).
    """
    node = data
    parts = key.split(".") if dotted else [key]
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RFIError(f"override '{key}': '{part}' is not a section")
    last = parts[-1]
    if isinstance(value, Mapping):
        if not into or not isinstance(node.get(last), dict):
            node[last] = {}
        for inner, item in value.items():
            _set_dotted(node[last], str(inner), item, dotted=False)
    else:
        node[last] = copy.deepcopy(value)


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge config mappings into a new one, later layers winning key by key.

    Sections (mappings) are merged recursively; any other value (lists included) replaces the
    earlier one. A dotted key at the top of a layer names a nested key: ``{"decoder.channels": 32}``
    is ``{"decoder": {"channels": 32}}``. The inputs are not modified.

    Example:
        >>> merge({"steps": 300, "optim": {"lr": 0.1, "schedule": "cosine"}}, {"optim.lr": 0.01}, {"steps": 5})
        {'steps': 5, 'optim': {'lr': 0.01, 'schedule': 'cosine'}}
    """
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            _set_dotted(out, str(key), value)
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Command-line ``a.b=value`` strings as a mapping of dotted keys; values are parsed as YAML.

    Example:
        >>> parse_overrides(["adv.eps=1", "layers=[layer1, layer2]", "out=", "per_layer={}"])
        {'adv.eps': 1, 'layers': ['layer1', 'layer2'], 'out': '', 'per_layer': {}}

    Raises:
        RFIError: an item without ``=`` or a value that is not valid YAML.
    """
    data: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RFIError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        try:
            data[key.strip()] = _load_yaml(raw) if raw else ""
        except yaml.YAMLError:
            raise RFIError(f"override '{item}': the value is not valid YAML") from None
    return data


def shipped_config(name: str | os.PathLike) -> Path:
    """The shipped config file ``configs/<name>``, in the installed ``configs`` package (any working directory).

    Example:
        >>> shipped_config("apps/style.yaml").is_file()
        True
    """
    return Path(str(importlib.resources.files("configs"))) / name


def config_path(path: str | os.PathLike) -> Path:
    """Where a config file is: ``path`` itself when it exists, else a ``configs/...`` path in the shipped copy.

    So ``configs/encoder/resnet18_robust.yaml`` works from the repository root (the file there)
    and from any other folder once the package is installed (the copy installed with it).
    """
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute() and p.parts[:1] == ("configs",) and len(p.parts) > 1:
        shipped = shipped_config(Path(*p.parts[1:]))
        if shipped.is_file():
            return shipped
    return p


def referenced_config(parent: str | os.PathLike, path: str | os.PathLike) -> Path:
    """A config file named inside the config file ``parent`` (e.g. the quickstart's run configs).

    A relative ``path`` is relative to ``parent``'s folder when the file is there, else to the
    shipped ``configs/``, where the defaults that name it live: a user's file that leaves the
    reference at its default (it changes only the keys it names) still finds the shipped file.

    Example:
        >>> referenced_config("/tmp/my_quickstart.yaml", "encoder/resnet18_robust.yaml").is_file()
        True
    """
    path = Path(path).expanduser()
    local = path if path.is_absolute() else Path(parent).parent / path
    if local.exists() or path.is_absolute():
        return local
    shipped = shipped_config(path)
    return shipped if shipped.is_file() else local


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping (``configs/...`` resolved by :func:`config_path`); a one-line error names a bad file."""
    path = config_path(path)
    if not path.is_file():
        raise RFIError(f"config file not found: {path}")
    try:
        data = _load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise RFIError(
            f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at position {e.start}): save it as UTF-8"
        ) from None
    except yaml.YAMLError as e:
        raise RFIError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RFIError(f"{path} must hold a mapping of config keys")
    return data


_SHIPPED_DEFAULTS: dict[type, tuple[str, str | None]] = {}  # class -> (file under configs/, section)


@functools.cache
def _shipped_yaml(path: Path) -> dict[str, Any]:
    return read_yaml(path)  # parsed once per process; callers get copies (see _section)


def _section(name: str, section: str | None) -> dict[str, Any]:
    data: Any = copy.deepcopy(_shipped_yaml(shipped_config(name)))
    for part in section.split(".") if section else []:
        data = data.get(part) if isinstance(data, dict) else None
        if not isinstance(data, dict):
            raise RFIError(f"configs/{name} has no section '{section}'")
    return data


def shipped_defaults(cls: type) -> dict[str, Any]:
    """The mapping of defaults a :func:`yaml_dataclass` reads from its shipped YAML (``{}`` for other classes)."""
    if cls not in _SHIPPED_DEFAULTS:
        return {}
    return _section(*_SHIPPED_DEFAULTS[cls])


def yaml_dataclass(name: str, section: str | None = None) -> Callable[[type[T]], type[T]]:
    """Make a config dataclass whose field defaults are written in the shipped YAML ``configs/<name>``.

    Use it instead of ``@dataclass`` on a class that declares its fields' types only (a
    :func:`bounded` field gives its range, not its default). Every field must have a key in
    the YAML (at ``section``, dotted for nested sections) and the YAML no other key, else
    importing the class fails naming the key; a default written in the class is refused too,
    so the YAML is the one place defaults are written. A field whose type is a dataclass
    defaults to that class built from the YAML section (keys it leaves out: the class's own
    defaults). :func:`load_config` fills a user's file from the same YAML.

    Args:
        name: the file, relative to ``configs/`` (e.g. ``"apps/style.yaml"``).
        section: the dotted section of the file holding this class's keys (``None``: the top level).

    Example:
        >>> @yaml_dataclass("apps/anomaly.yaml", "combined")
        ... class Weights:
        ...     reconstruction: float
        ...     memory: float
        >>> Weights()
        Weights(reconstruction=1.0, memory=1.0)
    """

    def wrap(cls: type[T]) -> type[T]:
        where = f"{section}." if section else ""
        source = f"configs/{name}"
        data = _section(name, section)
        hints = typing.get_type_hints(cls)
        names = [
            n for n in cls.__dict__.get("__annotations__", {}) if typing.get_origin(hints[n]) is not typing.ClassVar
        ]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise RFIError(f"unknown config key '{where}{unknown[0]}' in {source} (valid keys: {', '.join(names)})")
        for fname in names:
            key = f"{where}{fname}"
            if fname not in data:
                raise RFIError(f"{source} has no default for config key '{key}' of {cls.__name__}")
            written = cls.__dict__.get(fname, dataclasses.MISSING)
            metadata = written.metadata if isinstance(written, dataclasses.Field) else {}
            if (
                written.default is not dataclasses.MISSING or written.default_factory is not dataclasses.MISSING
                if isinstance(written, dataclasses.Field)
                else written is not dataclasses.MISSING
            ):
                raise RFIError(f"{cls.__name__}.{fname} has a default in code: write it in {source} ('{key}') only")
            hint, value = hints[fname], data[fname]
            if dataclasses.is_dataclass(hint):
                if not isinstance(value, dict):
                    raise RFIError(f"config key '{key}' in {source} must be a mapping, got {value!r}")
                _build(hint, value, f"{key}.", source)  # checked now, not at first use
                made = dataclasses.field(
                    default_factory=functools.partial(_build, hint, value, f"{key}.", source), metadata=metadata
                )
            else:
                value = _coerce(value, hint, key, source)
                if "range" in metadata:
                    _check_range(value, metadata["range"], key, source)
                if isinstance(value, (list, dict)):
                    made = dataclasses.field(default_factory=functools.partial(copy.deepcopy, value), metadata=metadata)
                else:
                    made = dataclasses.field(default=value, metadata=metadata)
            setattr(cls, fname, made)
        out = dataclasses.dataclass(cls)
        _SHIPPED_DEFAULTS[out] = (name, section)
        return out

    return wrap


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> T:
    """Build the dataclass ``cls``: its shipped defaults, then the file ``path``, then the overrides.

    The file changes only the keys it names: a section (a nested dataclass) it gives in part
    keeps its other keys, from the shipped YAML of ``cls`` (:func:`yaml_dataclass`); any other
    value (a number, a list, a free-form mapping such as ``per_layer``) is replaced whole. Each
    override then sets one dotted key, replacing what is there (``per_layer={}`` empties it).

    Args:
        cls: the job's config dataclass (fields may be nested dataclasses).
        path: YAML file (``configs/...`` resolved by :func:`config_path`), or ``None`` for the defaults.
        overrides: command-line strings ``a.b=value`` (values parsed as YAML: ``3``, ``0.1``,
            ``true``, ``[1, 2]``; see :func:`parse_overrides`), or a mapping of dotted keys to values.

    Raises:
        RFIError: missing file, bad YAML, unknown key, or a value of the wrong type.
    """
    over = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    cfg = _build(cls, read_yaml(path) if path is not None else {}, "", _Source(path, set()), rules=not over)
    if not over:
        return cfg
    data = config_to_dict(cfg)
    for key, value in over.items():
        _set_dotted(data, str(key).strip(), value, into=False)
    return _build(cls, data, "", _Source(path, set(over)))


def check_config(cfg: T, source: str = "the config") -> T:
    """Check a config built or changed in code as :func:`load_config` checks a file: types, ``Literal``
    choices, :func:`bounded` ranges and every section's ``check()``.

    Args:
        cfg: a config dataclass instance.
        source: what the error names as the values' origin; :data:`FLAGS` names each key as a
            command-line flag (``batch_size`` -> ``--batch-size``).

    Returns:
        A checked copy, values coerced as when loaded (e.g. an ``int`` given for a ``float``).

    Raises:
        RFIError: the first bad value, named by its key.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Flags:
        ...     batch_size: int = bounded(low=1)
        >>> check_config(Flags(batch_size=0), FLAGS)
        Traceback (most recent call last):
        encoders.core.errors.RFIError: --batch-size must be >= 1, got 0
    """
    return _build(type(cfg), dataclasses.asdict(cfg), "", source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict (safe to store in a ``weights_only`` checkpoint)."""
    return dataclasses.asdict(cfg)
