"""The ``rfi`` command line: one sub-command per job, dispatched to the package that owns it.

Each entry of :data:`COMMANDS` names the module in :mod:`apps.commands` whose
``register_<command>(parser)`` adds the sub-command's arguments and sets
``parser.set_defaults(func=run)``; only the chosen command's module is imported. The
libraries (``encoders``, ``inversion``, the app modules) parse no arguments. User errors
(:class:`~encoders.core.errors.RFIError`) print one line and exit with code 2; ``--debug`` shows
the traceback instead. A command spelt as it was before a rename (:data:`RENAMED`) gets one
line naming its new spelling, and exit code 2.

``key=value`` config overrides may stand anywhere after the command, also after its flags
(``rfi train-encoder --config X steps=2 --out D batch_size=8``): :func:`parse_command_line`
gathers them. ``SIGTERM`` (``kill``) ends a command as Ctrl-C does, running its clean-ups (run
locks released, temporary files removed), with exit code 143.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from apps.commands.common import common_flags
from encoders.core.errors import RFIError

COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("quickstart", "apps.commands.quickstart", "the main job: robust + standard encoders, decoders, evaluation report"),
    ("train-encoder", "apps.commands.train_encoder", "train a standard or adversarially robust (PGD) encoder"),
    ("eval-encoder", "apps.commands.eval_encoder", "clean and PGD accuracy of an encoder checkpoint"),
    ("train-decoder", "apps.commands.train_decoder", "train a decoder that inverts one layer of an encoder"),
    ("invert", "apps.commands.invert", "reconstruct images from their features (decoder or optimisation)"),
    ("evaluate", "apps.commands.evaluate", "PSNR / SSIM / LPIPS of decoders at several scales"),
    ("denoise", "apps.commands.denoise", "denoising: train a denoiser on robust features, apply it to images"),
    ("anomaly", "apps.commands.anomaly", "anomaly detection: fit on normal images, score test images"),
    ("style", "apps.commands.style", "style transfer: train a decoder pyramid, apply WCT / AdaIN through it"),
    ("segment", "apps.commands.segment", "semantic segmentation: train a shift-equivariant segmenter, label images"),
    ("augment", "apps.commands.augment", "write style-augmented views of images (SSL augmentation)"),
    ("ssl", "apps.commands.ssl", "self-supervised pre-training: SimCLR or MoCo v2, with style augmentation"),
    (
        "shift-consistency",
        "apps.commands.shift_consistency",
        "shift consistency / equivariance of encoders and autoencoders",
    ),
    ("weights", "apps.commands.weights", "RFI's shipped models and the zoo: list / show / fetch / retrain"),
)

RENAMED: dict[str, str] = {
    "train-denoiser": "rfi denoise train",
    "train-decoders": "rfi style train",
    "stylize": "rfi style apply",
}
"""Old command spellings -> the new ones (``rfi denoise FILES`` without a verb is :func:`renamed_command` too)."""
VERBS: dict[str, tuple[str, ...]] = {"denoise": ("train", "apply")}
"""Commands that once took files directly and now take a verb first."""


def renamed_command(argv: Sequence[str]) -> str | None:
    """The one-line error for an old spelling of a command in ``argv``, else ``None``.

    Example:
        >>> renamed_command(["train-denoiser", "--config", "x.yaml"])
        "'rfi train-denoiser' is now 'rfi denoise train' (see rfi denoise train --help)"
        >>> renamed_command(["denoise", "photo.png", "--out", "clean/"])
        "'rfi denoise FILES' is now 'rfi denoise apply FILES' (see rfi denoise apply --help)"
        >>> renamed_command(["denoise", "apply", "photo.png"]) is None
        True
    """
    words = [a for a in argv if a not in ("--debug", "--quiet")]
    if not words or words[0].startswith("-"):
        return None
    command, rest = words[0], words[1:]
    if command in RENAMED:
        return f"'rfi {command}' is now '{RENAMED[command]}' (see {RENAMED[command]} --help)"
    if command in VERBS and rest and not rest[0].startswith("-") and rest[0] not in VERBS[command]:
        new = f"rfi {command} {VERBS[command][-1]}"
        return f"'rfi {command} FILES' is now '{new} FILES' (see {new} --help)"
    return None


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The full parser; only the module of the command named in ``argv`` is imported."""
    parser = argparse.ArgumentParser(
        prog="rfi", parents=[common_flags()], description="RFI: robust feature inversion toolkit"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common_flags(suppress=True)])
        if name == chosen:
            register = getattr(importlib.import_module(module), "register_" + name.replace("-", "_"))
            register(p)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, where ``key=value`` words after a command's flags join its ``overrides``.

    argparse fills a ``key=value...`` positional from one run of words only; the words left after
    a later flag are added to it in order. Anything else left over is an error, as argparse says it.

    Example:
        >>> argv = ["train-encoder", "--config", "x.yaml", "steps=2", "--out", "d", "batch_size=8"]
        >>> parse_command_line(build_parser(argv), argv).overrides
        ['steps=2', 'batch_size=8']
    """
    args, extras = parser.parse_known_args(argv)
    if extras:
        if isinstance(getattr(args, "overrides", None), list) and all(
            "=" in word and not word.startswith("-") for word in extras
        ):
            args.overrides = [*args.overrides, *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


class Terminated(BaseException):
    """``SIGTERM`` as an exception (like ``KeyboardInterrupt``), so that a killed command cleans up."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rfi`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    old = renamed_command(argv)
    if old:
        print(f"rfi: error: {old}", file=sys.stderr)
        return 2
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        parser = build_parser(argv)
        args = parse_command_line(parser, argv)
        logging.basicConfig(
            level=logging.WARNING if args.quiet else logging.INFO,
            format="rfi: %(message)s",
            stream=sys.stderr,
            force=True,
        )
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, inside the handlers below
        return int(code or 0)
    except RFIError as e:
        if debug:
            raise
        print(f"rfi: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rfi: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("rfi: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # the reader went away (`rfi weights list | head`): stop quietly, as `cat` does
        # Python's documented recipe: stdout to devnull, so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
