"""RFI's own trained models, shipped inside the wheel: the manifest, hash-checked paths and the ``shipped:`` spelling.

The files live in the package folder ``encoders/weights/shipped/`` (package data) next to one
manifest, ``models.json``, which lists every model RFI ships: its name, kind (``encoder``,
``decoder``, ``style`` or ``denoise``), file, size, SHA-256, the shipped encoder it pairs with
and its card (training data, budget, the command and config that trained it, seed, time,
figures on unseen images, limits). ``rfi weights retrain`` writes both (see
``docs/shipped_models.md``).

Anywhere a checkpoint file is taken (a command's ``--encoder``/``--decoder``/``--model``, a
config key, ``create_encoder(checkpoint=...)``), ``shipped:NAME`` names a shipped model:
:func:`resolve_checkpoint` turns it into the file's path after checking that the file is there
and has the SHA-256 the manifest records. A model the manifest lists without a hash is "not in
this build" (it was not trained into this package); it is reported so, never replaced by
another model. A listed file that is missing or whose hash differs is a damaged install: the
one-line error names the file and how to reinstall or retrain it.

Decoders and app models (style pyramid, denoiser) reference their shipped encoder by name and
SHA-256 instead of holding a copy of its weights (:func:`encoder_reference`), so each encoder is
stored once; :func:`encoders.weights.checkpoints.encoder_from_checkpoint` follows the reference.

Example:
    >>> [m.name for m in shipped_models()][:2]
    ['rfi_resnet18_robust', 'rfi_resnet18_standard']
    >>> get_shipped("rfi_denoiser").kind
    'denoise'
    >>> path = resolve_checkpoint("shipped:rfi_resnet18_robust")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from encoders.core.errors import RFIError
from encoders.weights.zoo import sha256_file

SHIPPED_PREFIX = "shipped:"
"""How a shipped model is named where a checkpoint file is taken: ``shipped:rfi_resnet18_robust``."""
MANIFEST = "models.json"
FOLDER = Path(__file__).with_name("shipped")
"""The package folder holding the shipped files and :data:`MANIFEST` (tests point it elsewhere)."""
REINSTALL = "pip install --force-reinstall robust-inversion"
Kind = Literal["encoder", "decoder", "style", "denoise"]
KIND_NAMES = {
    "encoder": "an encoder",
    "decoder": "an inversion decoder",
    "style": "a style pyramid",
    "denoise": "a denoiser",
}
"""Each kind as messages name it."""
SHIPPED, NOT_IN_BUILD, DAMAGED = "shipped", "not in this build", "damaged"


@dataclass
class ShippedModel:
    """One entry of the manifest.

    Args:
        name: what ``shipped:NAME`` and ``rfi weights show NAME`` take.
        kind: ``encoder``, ``decoder`` (one layer's inversion decoder), ``style`` (a decoder
            pyramid) or ``denoise`` (a blind denoiser).
        file: the file name in :data:`FOLDER`.
        description: one line.
        run: the run folder ``rfi weights retrain`` trains it in (``<out>/<run>``), and the name of
            its config (``configs/shipped/<run>.yaml``).
        encoder: the shipped encoder it pairs with (``None`` for an encoder).
        size: the file's size in bytes (``None``: not in this build).
        sha256: the file's SHA-256 (``None``: not in this build).
        card: its model card: ``data``, ``budget``, ``command``, ``config``, ``seed``, ``trained``
            (how long, on what machine), ``figures`` (measured on unseen images), ``limits``.
    """

    name: str
    kind: Kind
    file: str
    description: str
    run: str
    encoder: str | None = None
    size: int | None = None
    sha256: str | None = None
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """Where the file belongs (in :data:`FOLDER`)."""
        return FOLDER / self.file

    @property
    def config(self) -> str:
        """The config that trains it: ``configs/shipped/<run>.yaml``."""
        return f"configs/shipped/{self.run}.yaml"


def read_manifest(folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The manifest of ``folder`` (default :data:`FOLDER`) as a dict: ``{"limit_mb": ..., "models": [...]}``.

    Raises:
        RFIError: it is missing or not valid JSON (a damaged install).
    """
    path = Path(folder if folder is not None else FOLDER) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RFIError(f"{path} cannot be read ({type(e).__name__}): a damaged install ({REINSTALL})") from None


def shipped_models(folder: str | os.PathLike | None = None) -> list[ShippedModel]:
    """Every model the manifest lists, in training order (encoders, decoders, style pyramid, denoiser)."""
    return [ShippedModel(**entry) for entry in read_manifest(folder)["models"]]


def get_shipped(name: str) -> ShippedModel:
    """The manifest entry called ``name`` (``shipped:`` in front is accepted).

    Raises:
        RFIError: no such model (the message lists the shipped names).
    """
    name = name.removeprefix(SHIPPED_PREFIX)
    models = {m.name: m for m in shipped_models()}
    if name not in models:
        raise RFIError(f"no shipped model '{name}' (shipped: {', '.join(models)}; see `rfi weights list`)")
    return models[name]


def retrain_command(name: str) -> str:
    """The command that retrains ``name`` (and what it needs) into ``runs/shipped`` and ships it."""
    return f"rfi weights retrain {name} --out runs/shipped --resume"


def status(model: ShippedModel) -> str:
    """``shipped`` (file present with the recorded hash), ``not in this build`` or ``damaged``."""
    if model.sha256 is None:
        return NOT_IN_BUILD
    if not model.path.is_file() or sha256_file(model.path) != model.sha256:
        return DAMAGED
    return SHIPPED


def shipped_path(name: str, flag: str | None = None) -> Path:
    """The path of the shipped model ``name``, checked: present, with the SHA-256 the manifest records.

    Args:
        name: a shipped name (``shipped:`` in front is accepted).
        flag: the option that passes a model of one's own instead (named in the error).

    Raises:
        RFIError: one line: an unknown name; a model not in this build (naming ``flag`` and the
            retrain command); a missing or damaged file (naming it, how to reinstall or retrain).
    """
    model = get_shipped(name)
    own = f"pass {flag} FILE to use a model of your own, or " if flag else ""
    if model.sha256 is None:
        raise RFIError(
            f"the shipped model {model.name} ({KIND_NAMES[model.kind]}) is not in this build: "
            f"{own}train it with `{retrain_command(model.name)}`"
        )
    fix = f"reinstall ({REINSTALL}) or retrain it (`{retrain_command(model.name)}`)"
    if not model.path.is_file():
        raise RFIError(f"shipped model file {model.path} is missing (a damaged install): {fix}")
    if sha256_file(model.path) != model.sha256:
        raise RFIError(
            f"shipped model file {model.path} does not match the SHA-256 in its manifest (a damaged install): {fix}"
        )
    return model.path


def resolve_checkpoint(spec: str | os.PathLike, flag: str | None = None, kind: Kind | None = None) -> str | os.PathLike:
    """``shipped:NAME`` -> the checked path of that shipped model (:func:`shipped_path`); anything else as given.

    Args:
        spec: a checkpoint path, or ``shipped:NAME``.
        flag: the option (or config key) the user gives a model of their own with, for messages.
        kind: the kind the caller needs: a shipped model of another kind is refused, naming both.

    Raises:
        RFIError: see :func:`shipped_path`; a shipped model of another kind than ``kind``.

    Example:
        >>> resolve_checkpoint("runs/encoders/resnet18_robust/checkpoint.pt")
        'runs/encoders/resnet18_robust/checkpoint.pt'
        >>> resolve_checkpoint("shipped:rfi_resnet18_robust", kind="denoise")
        Traceback (most recent call last):
        encoders.core.errors.RFIError: shipped:rfi_resnet18_robust is an encoder, not a denoiser
    """
    text = os.fspath(spec)
    if not text.startswith(SHIPPED_PREFIX):
        return spec
    model = get_shipped(text)
    if kind is not None and model.kind != kind:
        raise RFIError(f"{text} is {KIND_NAMES[model.kind]}, not {KIND_NAMES[kind]}")
    return shipped_path(model.name, flag)


def encoder_reference(name: str, sha256: str) -> dict[str, str]:
    """What a shipped decoder or app file holds in place of its encoder: the shipped encoder's name and hash."""
    return {"shipped": name, "sha256": sha256}


def referenced_encoder(reference: dict[str, Any], source: str) -> Path:
    """The file of the shipped encoder an :func:`encoder_reference` names, checked against the recorded hash.

    The encoder file beside ``source`` (``<name>.pt`` with the recorded hash: a folder that ``rfi weights
    retrain --ship-to`` wrote) is taken first, so such a folder's files load by path; otherwise the
    installed one.

    Raises:
        RFIError: neither is there with the recorded hash: not shipped, damaged, or another encoder than
            the reference's (the files of one install belong together: reinstall or retrain).
    """
    name = str(reference.get("shipped"))
    beside = Path(source).with_name(f"{name}.pt")
    if beside.is_file() and sha256_file(beside) == reference.get("sha256"):
        return beside
    try:
        path = shipped_path(name)
    except RFIError as e:
        raise RFIError(f"{source} needs its encoder {name}, and {e}") from None
    if get_shipped(name).sha256 != reference.get("sha256"):
        raise RFIError(
            f"{source} was made for another {name} than the one installed: reinstall ({REINSTALL}) "
            f"or retrain it (`{retrain_command(name)}`)"
        )
    return path


def as_dict(model: ShippedModel) -> dict[str, Any]:
    """The entry as a plain dict with its status and path (``rfi weights list --json``)."""
    return {**asdict(model), "status": status(model), "path": str(model.path)}


def write_manifest(models: list[ShippedModel], folder: str | os.PathLike, limit_mb: float) -> Path:
    """Write ``models.json`` into ``folder`` atomically (``rfi weights retrain``)."""
    from encoders.core.serialization import write_json

    entries = [asdict(m) for m in models]
    return write_json({"limit_mb": limit_mb, "models": entries}, Path(folder) / MANIFEST)
