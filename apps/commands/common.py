"""Argument helpers shared by several ``rfi`` commands (the libraries below ``apps/`` parse no arguments)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from encoders.core.config import FLAGS, check_config
from encoders.core.files import check_output_file, check_output_folder, reported_writes
from encoders.data.build import DataConfig

T = TypeVar("T")


def common_flags(suppress: bool = False) -> argparse.ArgumentParser:
    """The parent parser of the flags every ``rfi`` command takes: ``--debug`` and ``--quiet``.

    Args:
        suppress: for sub-command parsers: the flags default to ``argparse.SUPPRESS``, so a
            flag given before the sub-command keeps its value.
    """
    default = argparse.SUPPRESS if suppress else False
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=default, help="show tracebacks for errors")
    common.add_argument("--quiet", action="store_true", default=default, help="log warnings only")
    return common


def add_job_arguments(
    parser: argparse.ArgumentParser,
    config: str | None,
    overrides_example: str,
    out_help: str,
    resume_help: str = "continue the run in the output folder",
) -> None:
    """The arguments every training command shares: ``--config``, ``key=value`` overrides, ``--resume``, ``--out``.

    Args:
        parser: the command's parser.
        config: the default config file, or ``None`` to make ``--config`` required.
        overrides_example: an example of overrides for the help text.
        out_help: what ``--out`` names and its default.
        resume_help: what ``--resume`` does.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_job_arguments(p, "configs/x.yaml", "steps=10", "output folder")
        >>> vars(p.parse_args(["steps=10", "--resume"]))
        {'config': 'configs/x.yaml', 'overrides': ['steps=10'], 'resume': True, 'out': None}
    """
    if config is None:
        parser.add_argument("--config", required=True, help="YAML config (the shipped ones are under configs/)")
    else:
        parser.add_argument("--config", default=config, help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {overrides_example}")
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--out", help=out_help)


def add_flag(parser: argparse.ArgumentParser, flags: type, name: str, help: str, **kwargs: Any) -> None:
    """Add ``--name`` (``batch_size`` -> ``--batch-size``) whose default is the field ``name`` of the
    config class ``flags`` (so its shipped YAML), whose type is the field's, and whose choices are
    its ``Literal`` values; the help text ends with the default. :func:`checked_flags` checks the
    ranges (:func:`~encoders.core.config.bounded`) once parsed.

    Args:
        parser: the command's parser.
        flags: a :func:`~encoders.core.config.yaml_dataclass` holding the command's flag defaults.
        name: the field.
        help: what the flag does.
        **kwargs: more ``add_argument`` keywords (``metavar``, ``nargs``...).

    Example:
        >>> from apps.commands.invert import InvertFlags
        >>> p = argparse.ArgumentParser()
        >>> add_flag(p, InvertFlags, "steps", "Adam steps")
        >>> p.parse_args([]).steps, p.parse_args(["--steps", "5"]).steps
        (300, 5)
    """
    hint = typing.get_type_hints(flags)[name]
    inner = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is not None else [hint]
    if typing.get_origin(hint) is typing.Literal:
        kwargs.setdefault("choices", list(typing.get_args(hint)))
    elif len(inner) == 1 and inner[0] in (int, float, str):
        kwargs.setdefault("type", inner[0])
    default = getattr(flags(), name)
    shown = "none" if default is None else "%(default)s"
    parser.add_argument(
        "--" + name.replace("_", "-"), dest=name, default=default, help=f"{help} (default: {shown})", **kwargs
    )


def checked_flags(flags: type[T], args: argparse.Namespace) -> T:
    """The parsed values of the fields of ``flags`` (see :func:`add_flag`), checked: a value out of
    its range raises one line naming the flag (``--tile must be >= 1, got 0``)."""
    return check_config(flags(**{f.name: getattr(args, f.name) for f in dataclasses.fields(flags)}), FLAGS)


def flag_overrides(args: argparse.Namespace, section: str, names: Sequence[str]) -> dict[str, Any]:
    """The flags given on the command line (not ``None``) as overrides of the keys of the same names in
    a config ``section``, for a command whose defaults are its config file's (``rfi denoise apply``).

    Example:
        >>> flag_overrides(argparse.Namespace(tile=256, sigma=None), "apply", ["tile", "sigma"])
        {'apply.tile': 256}
    """
    return {f"{section}.{name}": getattr(args, name) for name in names if getattr(args, name) is not None}


def run_training(args: argparse.Namespace, config_class: type, train: Callable[..., Any], runs: str) -> int:
    """The ``run`` of ``rfi train-encoder`` / ``train-decoder``: load the config, pick the output folder
    (``--out``, else the config's ``out``, else ``<runs>/<config name>``) and check it, train (a full
    disk is one line naming the folder: :func:`~encoders.core.files.reported_writes`), and print the
    checkpoint's path on rank 0 (the only line on stdout, for scripts)."""
    from encoders.core.config import load_config

    cfg = load_config(config_class, args.config, args.overrides)
    if args.out is not None:
        cfg.out = args.out
    elif not cfg.out:
        cfg.out = str(Path(runs) / Path(args.config).stem)
    check_output_folder(cfg.out)  # empty, a file, too long a name, read-only: one line before any work
    with reported_writes(cfg.out):
        result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(os.fspath(result.path))
    return 0


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data SOURCE`` and ``--size PX`` of the commands that measure an encoder (see :func:`data_config`)."""
    parser.add_argument(
        "--data",
        metavar="SOURCE",
        help="validation data: 'embedded', an image folder, or 'cifar10:ROOT' "
        "(default: the data the encoder was trained on, else embedded)",
    )
    parser.add_argument("--size", type=int, help="image size (default: the training size, else 32 or 128)")


def data_config(
    spec: str | None, size: int | None, train_data: Mapping[str, Any] | None, small_input: bool
) -> DataConfig:
    """The data of ``--data SOURCE --size PX``; by default the data the encoder was trained on.

    Args:
        spec: ``None``, ``"embedded"``, ``"cifar10:ROOT"`` or an image folder.
        size: image size in px (default: the training size, else 32 for small-input encoders, else 128/224).
        train_data: the ``data`` section of the encoder's training config, if recorded.
        small_input: whether the encoder is a small-input (32 px) variant.

    Example:
        >>> data_config("cifar10:/data", None, None, True).source
        'cifar10'
    """
    if spec is None and train_data is not None:  # the data the encoder was trained on
        cfg = DataConfig(**train_data)
    elif spec in (None, "embedded"):
        cfg = DataConfig(size=32 if small_input else 128)
    elif spec.startswith("cifar10:"):
        cfg = DataConfig(source="cifar10", root=spec[len("cifar10:") :], size=32)
    else:
        cfg = DataConfig(source="folder", root=spec, size=32 if small_input else 224)
    if size:
        cfg.size = size
    return cfg


def json_output(flag_value: str | None, default: Path) -> Path:
    """The ``--json OUT`` file (default ``default``), checked writable before any work.

    Raises:
        RFIError: it is empty or names a folder, its name is too long, or its folder cannot be
            written (see :func:`~encoders.core.files.check_output_file`).
    """
    return check_output_file(default if flag_value is None else flag_value, flag="--json")
