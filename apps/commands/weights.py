"""``rfi weights list | show | fetch | retrain``: RFI's shipped models and the model zoo on the command line.

``list`` shows the models shipped inside the package (:mod:`encoders.weights.shipped`) beside the
downloadable ones (:mod:`encoders.weights.zoo`); ``show NAME`` prints one's card; ``fetch``
downloads zoo checkpoints; ``retrain`` retrains the shipped models from the embedded data with
their recorded configs (``configs/shipped/<run>.yaml``), evaluates them on the unseen images and
writes the weights-only files and the manifest (``models.json``) that ship them.

``retrain`` trains each model in a resumable run folder ``<out>/<run>`` (``encoder_robust``,
``encoder_standard``, ``decoder_robust_layer3``, ``decoder_standard_layer3``, ``style_pyramid``,
``denoiser``), encoders first; a model is retrained with the encoder it pairs with, and a shipped
model whose encoder was retrained without it is dropped from the manifest ("not in this build")
rather than left paired with weights it was not trained on.

Example:
    rfi weights list                      # shipped models, then the zoo: status, size, sha256, figures
    rfi weights show rfi_resnet18_robust  # its card: data, budget, command, config, figures, limits
    rfi weights fetch imagenet_l2_3_0     # -> ~/.cache/torch/hub/checkpoints/imagenet_l2_3_0.pt
    rfi weights retrain --out runs/shipped --resume            # all six, then ship them into the package
    rfi weights retrain rfi_denoiser --out runs/shipped --resume --ship-to dist/shipped
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from apps.commands.common import common_flags
from encoders.core.config import load_config, read_yaml, shipped_config
from encoders.core.errors import RFIError
from encoders.core.files import check_output_folder
from encoders.core.serialization import load_checkpoint, save_checkpoint
from encoders.weights import shipped, zoo
from encoders.weights.checkpoints import encoder_checkpoint, encoder_fingerprint, encoder_from_checkpoint

log = logging.getLogger("rfi")

SIGMAS = (15, 25, 50)
"""Noise levels (0-255 units) a shipped denoiser is measured at on the unseen images."""
ENCODER_FIGURES = ("clean_acc", "pgd_acc", "eps", "steps", "val_acc")
"""What an encoder's card reports of its training run's evaluation (PGD ``eps`` and ``steps``)."""
TRAINING_STATE = ("train", "discriminator")
"""Checkpoint keys a shipped file leaves out: optimiser, scheduler and RNG state, the GAN's discriminator."""


def register_weights(parser: argparse.ArgumentParser) -> None:
    """Add ``list``, ``show``, ``fetch`` and ``retrain`` to the ``weights`` command's parser."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = [common_flags(suppress=True)]  # also accepted after the action
    ls = sub.add_parser(
        "list",
        parents=common,
        help="the shipped models and the zoo's checkpoints, with status, size, hash and figures",
        description="List RFI's shipped models and the zoo's checkpoints (nothing is downloaded).",
    )
    ls.add_argument("--dest", help="zoo folder to look in (default: torch hub cache, torch.hub.get_dir()/checkpoints)")
    ls.add_argument("--json", action="store_true", help="print JSON (one object per model) instead of a table")
    show = sub.add_parser("show", parents=common, help="print a model's card (shipped) or entry (zoo)")
    show.add_argument("name", metavar="NAME", help="a shipped or zoo name (see `rfi weights list`)")
    fetch = sub.add_parser(
        "fetch",
        parents=common,
        help="download checkpoints (atomic, hash-checked) into the torch hub cache",
        description="Download zoo checkpoints: a temporary file is renamed into place only "
        "after its SHA-256 is checked (published hash) or recorded (first fetch).",
    )
    fetch.add_argument("names", nargs="+", metavar="NAME", help="zoo names (see `rfi weights list`)")
    fetch.add_argument("--dest", help="destination folder (default: torch hub cache)")
    fetch.add_argument("--force", action="store_true", help="download again even if a verified copy is present")
    retrain = sub.add_parser(
        "retrain",
        parents=common,
        help="retrain the shipped models from the embedded data, evaluate them, write their files and manifest",
        description="Retrain shipped models (default: all; each with the encoder it pairs with) in resumable run "
        "folders <out>/<run> from configs/shipped/<run>.yaml, measure them on the unseen images, and write "
        "their weights-only files and models.json into --ship-to.",
    )
    retrain.add_argument("names", nargs="*", metavar="NAME", help="shipped names (default: all)")
    retrain.add_argument("--out", required=True, help="folder of the training runs, e.g. runs/shipped")
    retrain.add_argument("--resume", action="store_true", help="continue (or reuse) the runs in --out")
    retrain.add_argument("--ship-to", help=f"where the files and manifest go (default: the package's {shipped.FOLDER})")
    retrain.add_argument(
        "--tiny", action="store_true", help="the budgets of configs/shipped/tiny.yaml: seconds, a test of the command"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return list_models(args.dest, args.json)
    if args.action == "show":
        print(card_text(args.name))
        return 0
    if args.action == "retrain":
        ship_to = Path(args.ship_to) if args.ship_to else shipped.FOLDER
        for path in retrain(args.names, Path(args.out), args.resume, ship_to, args.tiny):
            print(path)
        return 0
    for name in args.names:  # unknown names fail before anything downloads
        zoo.get_entry(name)
    for name in args.names:
        path = zoo.fetch(name, args.dest, force=args.force, show_progress=not args.quiet)
        print(path)
    return 0


# ----------------------------------------------------------------------------- list, show
def figures_text(figures: Mapping[str, Any] | None) -> str:
    """A shipped model's figures in one short line (``-`` when it has none).

    Example:
        >>> figures_text({"unseen_psnr": 21.234, "unseen_images": 10})
        'unseen_psnr 21.23, unseen_images 10'
    """
    if not figures:
        return "-"
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())


def list_models(dest: str | None, as_json: bool) -> int:
    """``rfi weights list``: the shipped models, then the zoo's checkpoints."""
    own = [{"origin": "shipped", **shipped.as_dict(m)} for m in shipped.shipped_models()]
    rows = [{"origin": "zoo", **zoo.as_dict(e, dest)} for e in zoo.entries()]
    if as_json:
        print(json.dumps(own + rows, indent=1))
        return 0
    head = f"{'shipped with RFI':<30} {'kind':<8} {'MB':>6} {'sha256':<14} {'status':<18}"
    print(f"{head} figures (docs/shipped_models.md: what each measures)")
    for r in own:
        size = f"{r['size'] / 1e6:.1f}" if r["size"] else "-"
        digest = r["sha256"][:12] if r["sha256"] else "-"
        figures = figures_text(r["card"].get("figures"))
        print(f"{r['name']:<30} {r['kind']:<8} {size:>6} {digest:<14} {r['status']:<18} {figures}")
    print(f"\n{'model zoo':<22} {'arch':<9} {'dataset':<9} {'sha256':<18} {'status':<23} description")
    for r in rows:
        check = f"prefix {r['sha256']}" if r["sha256"] else "recorded on fetch"
        print(f"{r['name']:<22} {r['arch']:<9} {r['dataset']:<9} {check:<18} {r['status']:<23} {r['description']}")
    print(
        f"\nshipped models: shipped:NAME wherever a model file is taken (rfi weights show NAME: its card); "
        f"zoo files go to {zoo.destination(zoo.entries()[0], dest).parent} (fetch: rfi weights fetch NAME)"
    )
    return 0


def card_text(name: str) -> str:
    """``rfi weights show NAME``: a shipped model's card, or a zoo entry's fields.

    Raises:
        RFIError: neither a shipped nor a zoo name (listing both).
    """
    names = {m.name: m for m in shipped.shipped_models()}
    if name.removeprefix(shipped.SHIPPED_PREFIX) in names:
        model = names[name.removeprefix(shipped.SHIPPED_PREFIX)]
        lines = [
            f"{model.name}: {model.description}",
            f"  kind      {shipped.KIND_NAMES[model.kind]}"
            + (f", pairs with the shipped encoder {model.encoder}" if model.encoder else ""),
            f"  status    {shipped.status(model)}",
            f"  file      {model.path}" + (f" ({model.size / 1e6:.1f} MB)" if model.size else ""),
            f"  sha256    {model.sha256 or '-'}",
            f"  use       shipped:{model.name}",
        ]
        for key, value in model.card.items():
            if key == "figures":
                shown = figures_text(value)
            else:
                shown = json.dumps(value) if isinstance(value, (dict, list)) else ("-" if value is None else value)
            lines.append(f"  {key:<9} {shown}")
        return "\n".join(lines)
    if name.removeprefix(zoo.ZOO_PREFIX) in zoo.ENTRIES:
        row = zoo.as_dict(zoo.get_entry(name))
        return "\n".join([f"{row['name']}: {row['description']}"] + [f"  {k:<12} {v}" for k, v in row.items()])
    raise RFIError(
        f"unknown model '{name}' (shipped: {', '.join(names)}; zoo: {', '.join(zoo.ENTRIES)}; see `rfi weights list`)"
    )


# ----------------------------------------------------------------------------- retrain: train
def chosen_models(names: Sequence[str]) -> list[shipped.ShippedModel]:
    """The shipped models to retrain: ``names`` (default: all) and the encoders they pair with, in manifest order.

    Raises:
        RFIError: an unknown name.
    """
    models = shipped.shipped_models()
    wanted = {shipped.get_shipped(n).name for n in names} if names else {m.name for m in models}
    wanted |= {m.encoder for m in models if m.name in wanted and m.encoder}
    return [m for m in models if m.name in wanted]


def _encoder_run(model: shipped.ShippedModel, out: Path) -> str:
    return str(out / shipped.get_shipped(model.encoder).run / "checkpoint.pt")


def train_model(model: shipped.ShippedModel, out: Path, resume: bool, budget: Mapping[str, Any]) -> Path:
    """Train (or resume) one shipped model in ``<out>/<run>`` from its config plus ``budget`` overrides.

    Returns:
        The file the run writes: an encoder or decoder checkpoint, a pyramid or a denoiser file.
    """
    run_dir = out / model.run
    if model.kind == "encoder":
        from encoders.robust.train import TrainEncoderConfig, train_encoder

        cfg = load_config(TrainEncoderConfig, model.config, {**budget, "out": str(run_dir)})
        return Path(train_encoder(cfg, resume=resume).path)
    if model.kind == "decoder":
        from inversion.train import TrainDecoderConfig, train_decoder

        fixed = {"encoder.checkpoint": _encoder_run(model, out), "out": str(run_dir)}
        return Path(train_decoder(load_config(TrainDecoderConfig, model.config, {**budget, **fixed}), resume).path)
    if model.kind == "style":
        from apps.style.config import StyleConfig
        from apps.style.pyramid import train_pyramid

        fixed = {
            "train.encoder.checkpoint": _encoder_run(model, out),
            "out": str(run_dir / "pyramid.pt"),
            "runs": str(run_dir / "decoders"),
        }
        return Path(train_pyramid(load_config(StyleConfig, model.config, {**budget, **fixed}), resume).path)
    from apps.denoise import load_denoiser_config, train_denoiser

    fixed = {
        "train.encoder.checkpoint": _encoder_run(model, out),
        "train.out": str(run_dir),
        "model": str(run_dir / "denoiser.pt"),
    }
    return Path(train_denoiser(load_denoiser_config(model.config, {**budget, **fixed}), resume).path)


def training_seconds(run_dir: Path) -> tuple[float, str]:
    """The wall seconds a run trained, over every session it took, and a note on what was not timed.

    Read from the last ``train_seconds`` of each ``metrics.jsonl`` under ``run_dir`` (one per
    training run: a pyramid has one per layer), which the training scaffold carries across
    ``--resume`` (:meth:`encoders.core.trainer.Trainer.elapsed`). A run resumed from a checkpoint
    written before runs were timed is timed from that step on; its time is extrapolated to all its
    steps and the note says so.
    """
    total, notes = 0.0, []
    for metrics in sorted(run_dir.rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        timed = [r for r in rows if "train_seconds" in r]
        if not timed:
            notes.append(f"{metrics.parent.relative_to(run_dir.parent)} not timed")
            continue
        last = timed[-1]
        seconds, start, steps = float(last["train_seconds"]), int(last.get("timed_from_step", 0)), int(last["step"])
        if start:
            seconds *= steps / max(1, steps - start)
            notes.append(f"steps 1-{start} of {steps} not timed: extrapolated from the rest")
        total += seconds
    return total, "; ".join(notes)


def machine() -> str:
    """This machine in words, for the cards: processor, CPU count, torch threads, GPU if used."""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads{gpu}"


# ----------------------------------------------------------------------------- retrain: evaluate
def evaluate_model(
    model: shipped.ShippedModel, files: Mapping[str, Path], images: list[tuple[str, torch.Tensor]]
) -> dict[str, Any]:
    """The figures of a trained model for its card, measured on whole unseen images at their full size.

    Encoders: the clean and PGD accuracy of their training run's evaluation. Decoders: inversion
    PSNR with their encoder (mean over the images). Denoisers: PSNR at :data:`SIGMAS` (and of the
    noisy inputs). Style pyramids: each layer's validation PSNR.
    """
    from inversion.autoencoder import RobustAutoencoder
    from inversion.metrics import psnr

    if model.kind == "encoder":
        ckpt = load_checkpoint(files[model.name])
        found = {**(ckpt.get("eval") or {}), "val_acc": (ckpt.get("metrics") or {}).get("val_acc")}
        return {k: found[k] for k in ENCODER_FIGURES if found.get(k) is not None}
    if model.kind == "style":
        pyramid = RobustAutoencoder.load(files[model.name])
        return {f"{k}_val_psnr": v for k, v in (pyramid.metadata.get("val_psnr") or {}).items() if v is not None}
    if model.kind == "decoder":
        ae = RobustAutoencoder.from_checkpoints(files[model.encoder], files[model.name])
        values = [float(psnr(x[None], ae.reconstruct(x[None]))) for _, x in images]
        return {"unseen_psnr": sum(values) / len(values), "unseen_images": len(values)}
    from apps.denoise import add_noise, load_denoiser

    denoiser, _ = load_denoiser(files[model.name])
    figures: dict[str, Any] = {}
    for sigma in SIGMAS:
        noisy_db, clean_db = [], []
        for i, (_, x) in enumerate(images):
            noisy = add_noise(x[None], sigma, torch.Generator().manual_seed(i))
            noisy_db.append(float(psnr(x[None], noisy)))
            clean_db.append(float(psnr(x[None], denoiser.reconstruct(noisy))))
        figures[f"psnr_sigma{sigma}"] = sum(clean_db) / len(clean_db)
        figures[f"noisy_psnr_sigma{sigma}"] = sum(noisy_db) / len(noisy_db)
    figures["unseen_images"] = len(images)
    return figures


# ----------------------------------------------------------------------------- retrain: ship
def shipped_file(
    model: shipped.ShippedModel, trained: Path, encoders: Mapping[str, shipped.ShippedModel], ship_to: Path
) -> dict[str, Any]:
    """The weights-only dict a shipped file holds: the trained file without its training state; a decoder
    names its shipped encoder, a pyramid or denoiser holds a reference to it instead of its weights.

    Raises:
        RFIError: an app file whose encoder is not the shipped encoder exported with it.
    """
    ckpt = load_checkpoint(trained)
    if model.kind == "encoder":
        encoder = encoder_from_checkpoint(ckpt, str(trained))
        return encoder_checkpoint(encoder, shipped=model.name, eval=ckpt.get("eval"), metrics=ckpt.get("metrics"))
    data = {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}
    paired = encoders[model.encoder]
    if model.kind == "decoder":
        return {**data, "encoder_path": shipped.SHIPPED_PREFIX + paired.name}
    own = encoder_fingerprint(encoder_from_checkpoint(ckpt["encoder"], f"{trained} (encoder)"))
    paired_file = ship_to / paired.file
    if own != encoder_fingerprint(encoder_from_checkpoint(load_checkpoint(paired_file), str(paired_file))):
        raise RFIError(f"{trained} holds another encoder than the shipped {paired.name}: retrain them together")
    return {**data, "encoder": shipped.encoder_reference(paired.name, paired.sha256)}


def ship(
    trained: Mapping[str, Path], cards: Mapping[str, dict[str, Any]], ship_to: Path
) -> tuple[list[shipped.ShippedModel], float]:
    """Write the shipped files of the models in ``trained`` into ``ship_to`` and update their manifest entries
    (size, sha256, card); entries whose encoder was re-shipped with other weights, without them, are reset
    ("not in this build"); an encoder re-shipped unchanged (a finished run reused) keeps its app files, and a
    ``ship_to`` outside the package gets copies of the package's files of the models kept, so it holds every file its
    manifest lists.

    Returns:
        The manifest's models and its size limit in MB.
    """
    manifest = shipped.read_manifest(ship_to if (ship_to / shipped.MANIFEST).is_file() else None)
    models = [shipped.ShippedModel(**entry) for entry in manifest["models"]]
    by_name = {m.name: m for m in models}
    changed = set()  # models whose weights differ from the ones this manifest listed
    for name, path in trained.items():  # in manifest order: encoders first, so app files can reference them
        model = by_name[name]
        save_checkpoint(shipped_file(model, path, by_name, ship_to), ship_to / model.file)
        before, model.sha256 = model.sha256, zoo.sha256_file(ship_to / model.file)
        if model.sha256 != before:
            changed.add(name)
        model.size = (ship_to / model.file).stat().st_size
        model.card = {**model.card, **cards[name]}
    for model in models:
        if model.name in trained or model.sha256 is None:
            continue
        if model.encoder in changed:
            log.warning(
                "%s was trained on the former %s: dropped from this build (retrain it too)", model.name, model.encoder
            )
            drop(model, ship_to)
        elif not complete(model, ship_to):
            log.warning("%s: its file is in neither %s nor the package: dropped from this build", model.name, ship_to)
            drop(model, ship_to)
    return models, float(manifest["limit_mb"])


def complete(model: shipped.ShippedModel, ship_to: Path) -> bool:
    """Whether ``ship_to`` holds ``model``'s file with its recorded hash, copying the package's file there first when
    ``ship_to`` is another folder (so a ``--ship-to`` folder is a whole shipped set, ready to replace the package's)."""
    target, source = ship_to / model.file, shipped.FOLDER / model.file
    if not target.is_file() and source.is_file() and zoo.sha256_file(source) == model.sha256:
        shutil.copyfile(source, target)
    return target.is_file() and zoo.sha256_file(target) == model.sha256


def drop(model: shipped.ShippedModel, ship_to: Path) -> None:
    """Reset ``model``'s manifest entry to "not in this build" and remove its file from ``ship_to``."""
    (ship_to / model.file).unlink(missing_ok=True)
    model.sha256, model.size = None, None
    model.card = {**model.card, "trained": None, "figures": None}


def retrain(names: Sequence[str], out: Path, resume: bool, ship_to: Path, tiny: bool = False) -> list[Path]:
    """``rfi weights retrain``: train, evaluate and ship the shipped models ``names`` (default: all).

    Args:
        names: shipped names; the encoders they pair with are retrained (or resumed) with them.
        out: folder of the run folders ``<out>/<run>``.
        resume: continue the runs there (a finished run is reused as it is).
        ship_to: where the files and ``models.json`` are written (the package's shipped folder to ship them).
        tiny: the budgets of ``configs/shipped/tiny.yaml`` (seconds; tests the command, ships toy models).

    Returns:
        The files written: each model's file, then the manifest.

    Raises:
        RFIError: an unknown name, a run in the way without ``resume``, a config that does not load,
            or files larger together than the manifest's ``limit_mb``.
    """
    models = chosen_models(names)
    check_output_folder(out, flag="--out")
    check_output_folder(ship_to, flag="--ship-to")
    tiny_budgets = read_yaml(shipped_config("shipped/tiny.yaml")) if tiny else {}
    count = tiny_budgets.pop("unseen_images", None)
    trained: dict[str, Path] = {}
    cards: dict[str, dict[str, Any]] = {}
    for i, model in enumerate(models):
        log.info("shipped model %d/%d: %s (%s) in %s", i + 1, len(models), model.name, model.config, out / model.run)
        trained[model.name] = train_model(model, out, resume, tiny_budgets.get(model.run, {}))
        seconds, untimed = training_seconds(out / model.run)
        recorded = read_yaml(shipped_config(f"shipped/{model.run}.yaml"))
        cards[model.name] = {
            "trained": (f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.0f} s")
            + f" on {machine()}"
            + (" (--tiny budget)" if tiny else "")
            + (f" ({untimed})" if untimed else ""),
            "seed": recorded.get("seed", recorded.get("train", {}).get("seed")),
        }
    from inversion.evaluate import UNSEEN, whole_images

    images = whole_images(count, UNSEEN)
    for model in models:
        cards[model.name]["figures"] = evaluate_model(model, trained, images)
        log.info("%s: %s", model.name, figures_text(cards[model.name]["figures"]))
    manifest, limit_mb = ship(trained, cards, ship_to)
    total = sum(m.size or 0 for m in manifest)
    if total > limit_mb * 1e6:
        raise RFIError(
            f"the shipped files in {ship_to} take {total / 1e6:.1f} MB, more than the {limit_mb:g} MB the wheel "
            f"allows: lower the models' width or channels in configs/shipped/"
        )
    written = [ship_to / m.file for m in manifest if m.name in trained]
    return [*written, shipped.write_manifest(manifest, ship_to, limit_mb)]
