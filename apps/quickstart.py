"""``rfi quickstart``: the main job, end to end on the embedded photos (no download).

1. trains the default standard and robust (L2 PGD) encoders,
2. trains one decoder for ``layer3`` of each (same architecture, losses and budget),
3. evaluates both on held-out crops at 1x, 2x and 4x the training size,
4. writes ``report.md`` (table + grids), ``report.json`` and ``grid_<s>x.png`` to ``--out``.

Every training run is cached under ``<out>/encoders/<run>-<hash>`` and
``<out>/decoders/<run>-<hash>``, the hash being that of the resolved config (the
decoder's includes its encoder's path, so a retrained encoder retrains its decoder): a
second call reuses finished runs and resumes killed ones; ``--force`` trains afresh.
Budgets (``--budget``) are config overrides in ``configs/quickstart.yaml``.

Example:
    rfi quickstart --out runs/quickstart            # minutes on a CPU (timings: docs/benchmarks.md)
    rfi quickstart --out /tmp/qs --budget tiny      # a smoke test of a few seconds
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from encoders.core.config import (
    bounded,
    config_path,
    config_to_dict,
    load_config,
    parse_overrides,
    referenced_config,
    yaml_dataclass,
)
from encoders.core.errors import RFIError
from encoders.core.files import check_output_folder, reported_writes
from encoders.core.rundir import TrainResult
from encoders.core.runtime import resolve_device
from encoders.core.serialization import atomic_write, write_json
from encoders.weights import shipped
from inversion import RobustAutoencoder
from inversion.evaluate import UNSEEN, compare_autoencoders, format_table, lpips_for

log = logging.getLogger("rfi")
DEFAULT_CONFIG = "configs/quickstart.yaml"
RUN_NAMES = ("standard", "robust")  # column order of the grids: original | standard | robust


@dataclass
class RunSection:
    """One encoder config and the decoder config trained on it (paths relative to the quickstart YAML, else to the
    shipped configs/: see :func:`~encoders.core.config.referenced_config`)."""

    encoder: str
    decoder: str


@yaml_dataclass("quickstart.yaml", "runs")
class RunsSection:
    standard: RunSection
    robust: RunSection


@yaml_dataclass("quickstart.yaml", "eval")
class EvalSection:
    """Held-out evaluation: ``num`` embedded validation crops per scale (multiples of the training size),
    and as many crops of the unseen images (``unseen``)."""

    scales: list[int] = bounded(low=1)
    num: int = bounded(low=1)
    unseen: bool
    seed: int
    grid_rows: int = bounded(low=1)
    lpips_net: Literal["alex", "vgg"]
    lpips_weights: str | None
    shipped: bool

    def check(self) -> None:
        if not self.scales:
            raise RFIError("eval.scales is empty: give at least one multiple of the training size (e.g. [1, 2, 4])")


@yaml_dataclass("quickstart.yaml")
class QuickstartConfig:
    """``configs/quickstart.yaml``: the two runs, the budgets (config overrides) and the evaluation.

    ``budgets``: ``{name: {"encoder": [key=value, ...], "decoder": [...]}}`` applied on top of
    the runs' configs; ``budget`` picks one (``--budget`` overrides it). ``out``: the output
    folder (``--out`` overrides it). ``device``: ``auto``, ``cpu``, ``cuda``, ...
    """

    runs: RunsSection
    budget: str
    budgets: dict[str, Any]
    eval: EvalSection
    out: str
    device: str


def _budget(cfg: QuickstartConfig, name: str, source: str) -> dict[str, dict[str, Any]]:
    """The budget's overrides ``{"encoder": {...}, "decoder": {...}, "eval": {...}}``, parsed from its
    ``key=value`` lists."""
    if name not in cfg.budgets:
        raise RFIError(f"unknown budget '{name}' in {source} (valid: {', '.join(cfg.budgets)})")
    spec = cfg.budgets[name] or {}
    if not isinstance(spec, dict) or set(spec) - {"encoder", "decoder", "eval"}:
        raise RFIError(f"budgets.{name} in {source} may only hold encoder, decoder and eval lists of key=value")
    lists = {k: spec.get(k) or [] for k in ("encoder", "decoder", "eval")}
    for key, items in lists.items():
        if not isinstance(items, list) or not all(isinstance(i, str) and "=" in i for i in items):
            raise RFIError(f"budgets.{name}.{key} in {source} must be a list of key=value strings")
    return {key: parse_overrides(items) for key, items in lists.items()}


def _config_hash(cfg: Any) -> str:
    d = config_to_dict(cfg)
    d.pop("out", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _train(
    kind: str, name: str, cfg: Any, root: Path, force: bool, encoder: Any = None
) -> tuple[TrainResult, dict[str, Any]]:
    """Train (or reuse) one run under ``root/<name>-<config hash>``; returns the trainer's result
    (checkpoint, trained module, metrics) and a summary. ``encoder``: a decoder's trained encoder, in memory."""
    out = root / f"{name}-{_config_hash(cfg)}"
    cfg.out = str(out)
    if force and out.exists():
        shutil.rmtree(out)
    cached = (out / ("checkpoint.pt" if kind == "encoder" else "decoder.pt")).is_file()
    log.info("%s %s %s -> %s", "reusing/resuming" if cached else "training", name, kind, out)
    start = time.perf_counter()
    if kind == "encoder":
        from encoders.robust.train import train_encoder

        result = train_encoder(cfg, resume=True)
    else:
        from inversion.train import train_decoder

        result = train_decoder(cfg, resume=True, encoder=encoder)
    return result, {"path": str(result.path), "cached": cached, "seconds": time.perf_counter() - start}


SHIPPED_PAIRS = {
    "shipped robust": ("rfi_resnet18_robust", "rfi_resnet18_robust_layer3"),
    "shipped standard": ("rfi_resnet18_standard", "rfi_resnet18_standard_layer3"),
}
"""``eval.shipped``: the report's rows for RFI's shipped pairs -> (encoder, layer3 decoder), trained for hours."""


def shipped_pairs(device: torch.device) -> tuple[dict[str, RobustAutoencoder], dict[str, dict[str, Any]]]:
    """The shipped pairs of :data:`SHIPPED_PAIRS` this build has, loaded (hash-checked), and what the report says of
    them (names, training times, the encoder's accuracies); a pair not in this build is left out with a log line.

    Raises:
        RFIError: a shipped file that is missing or damaged (one line naming it).
    """
    models: dict[str, RobustAutoencoder] = {}
    cards: dict[str, dict[str, Any]] = {}
    for name, pair in SHIPPED_PAIRS.items():
        entries = [shipped.get_shipped(n) for n in pair]
        if any(e.sha256 is None for e in entries):
            log.info("%s: not in this build (rfi weights list), left out of the report", name)
            continue
        models[name] = RobustAutoencoder.from_checkpoints(*(shipped.shipped_path(n) for n in pair), device=device)
        cards[name] = {
            "encoder": pair[0],
            "decoder": pair[1],
            "trained": [e.card.get("trained") for e in entries],
            "eval": entries[0].card.get("figures"),
        }
    return models, cards


def run_quickstart(
    out: str | os.PathLike | None = None,
    config: str | os.PathLike = DEFAULT_CONFIG,
    budget: str | None = None,
    overrides: tuple[str, ...] = (),
    force: bool = False,
) -> dict[str, Any]:
    """Train (or reuse) both encoders and decoders, evaluate them, write the report; returns ``report.json``'s content.

    Args:
        out: output folder (caches, grids, ``report.md``, ``report.json``; default: the config's ``out``).
        config: the quickstart YAML.
        budget: a name in the YAML's ``budgets`` (default: its ``budget`` key).
        overrides: ``key=value`` overrides of the quickstart config.
        force: retrain even when finished runs with the same config are cached.
    """
    from encoders.robust.train import TrainEncoderConfig
    from inversion.train import TrainDecoderConfig

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    config = config_path(config)
    over = parse_overrides(overrides)
    cfg = load_config(QuickstartConfig, config, over)
    budget = budget or cfg.budget
    spec = _budget(cfg, budget, str(config))
    enc_over, dec_over = spec["encoder"], spec["decoder"]
    if spec["eval"]:  # the budget's evaluation settings, then the command line's overrides
        cfg = load_config(QuickstartConfig, config, {**{f"eval.{k}": v for k, v in spec["eval"].items()}, **over})
    out = out if out is not None else cfg.out
    check_output_folder(out)  # empty, a file in the way, a long name or a read-only place: one line, before any work
    out = Path(out)
    with reported_writes(out):  # a full disk: one line naming the folder
        runs = {name: getattr(cfg.runs, name) for name in RUN_NAMES}
        report: dict[str, Any] = {"budget": budget, "config": str(config), "out": str(out), "runs": {}}
        device = {"device": cfg.device}
        reference, report["shipped"] = shipped_pairs(resolve_device(cfg.device)) if cfg.eval.shipped else ({}, {})
        models: dict[str, RobustAutoencoder] = {}
        train_sizes = set()
        steps, total = 0, 2 * len(runs)
        for name, spec in runs.items():
            enc_cfg = load_config(TrainEncoderConfig, referenced_config(config, spec.encoder), {**enc_over, **device})
            steps += 1
            log.info("[%d/%d] %s encoder", steps, total, name)
            enc, enc_info = _train("encoder", name, enc_cfg, out / "encoders", force)
            dec_cfg = load_config(
                TrainDecoderConfig,
                referenced_config(config, spec.decoder),
                {**dec_over, **device, "encoder.checkpoint": str(enc.path)},
            )
            steps += 1
            log.info("[%d/%d] %s decoder for %s", steps, total, name, dec_cfg.encoder.layer)
            dec, dec_info = _train("decoder", name, dec_cfg, out / "decoders", force, encoder=enc.model)
            # the trained modules and their metrics come back from the trainers: no checkpoint is read again
            models[name] = RobustAutoencoder(enc.model, dec.model).to(resolve_device(cfg.device))
            enc_info["eval"] = enc.metrics.get("eval")
            dec_info["val_psnr"] = dec.metrics.get("val_psnr")
            report["runs"][name] = {
                "encoder": enc_info,
                "decoder": dec_info,
                "layer": dec_cfg.encoder.layer,
                "adversarial": config_to_dict(enc_cfg)["adv"],
            }
            train_sizes.add(int(dec_cfg.data.size))
        if len(train_sizes) != 1:
            raise RFIError(
                f"the decoders were trained at different sizes {sorted(train_sizes)}: the comparison "
                f"needs one data.size"
            )
        train_size = train_sizes.pop()

        log.info(
            "evaluating on %d held-out crops per scale at %s x %d px",
            cfg.eval.num,
            ", ".join(f"{s}" for s in cfg.eval.scales),
            train_size,
        )
        lpips_model, note = lpips_for(cfg.eval.lpips_net, cfg.eval.lpips_weights, resolve_device(cfg.device))
        t_eval = time.perf_counter()
        models.update(reference)  # the report lists this run's pairs first, then the shipped ones
        result = compare_autoencoders(
            models,
            cfg.eval.scales,
            train_size,
            cfg.eval.num,
            cfg.eval.seed,
            lpips_model=lpips_model,
            lpips_note=note,
            grid_dir=out,
            grid_rows=cfg.eval.grid_rows,
        )
        report["evaluation"] = result
        if cfg.eval.unseen:  # the same comparison on images no model trained on
            report["evaluation_unseen"] = compare_autoencoders(
                models,
                cfg.eval.scales,
                train_size,
                cfg.eval.num,
                cfg.eval.seed,
                folder=UNSEEN,
                lpips_model=lpips_model,
                lpips_note=note,
                grid_dir=out / "unseen",
                grid_rows=cfg.eval.grid_rows,
            )
        report["seconds"] = {"total": time.perf_counter() - t0, "evaluation": time.perf_counter() - t_eval}
        report["machine"] = {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        }
        write_json(report, out / "report.json")
        text = render_report(report)
        atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
        return report


def _fmt_acc(ev: dict[str, Any] | None) -> str:
    if not ev:
        return "n/a | n/a"
    return f"{100 * ev['clean_acc']:.1f}% | {100 * ev['pgd_acc']:.1f}%"


def render_report(report: dict[str, Any]) -> str:
    """``report.md``: what was trained, the PSNR/SSIM/LPIPS table, the robust-minus-standard gap, the grids."""
    ev = report["evaluation"]
    lines = [
        "# RFI quickstart report",
        "",
        f"Budget `{report['budget']}` ({report['config']}); total {report['seconds']['total'] / 60:.1f} min "
        f"on {report['machine']['cpus']} CPUs (load average {report['machine']['load_average_start'][0]:.1f} "
        f"at start).",
        "",
        "## Encoders and decoders",
        "",
        "| run | encoder training | clean acc | PGD acc | decoder | decoder val PSNR (dB) | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        adv = r["adversarial"]
        kind = f"PGD {adv['norm']} eps={adv['eps']:g}, {adv['steps']} steps" if adv["enabled"] else "standard"
        secs = r["encoder"]["seconds"] + r["decoder"]["seconds"]
        cached = " (cached)" if r["encoder"]["cached"] and r["decoder"]["cached"] else ""
        vp = r["decoder"]["val_psnr"]
        lines.append(
            f"| {name} | {kind} | {_fmt_acc(r['encoder']['eval'])} | {r['layer']} | "
            f"{'n/a' if vp is None else f'{vp:.2f}'} | {secs / 60:.1f} min{cached} |"
        )
    for name, card in report.get("shipped", {}).items():
        took = " + ".join(str(t).split(" on ")[0] for t in card["trained"])
        lines.append(
            f"| {name} | shipped: `{card['encoder']}` + `{card['decoder']}` | {_fmt_acc(card['eval'])} | layer3 | "
            f"n/a | {took} (shipped) |"
        )
    pgd = next((r["encoder"]["eval"] for r in report["runs"].values() if r["encoder"]["eval"]), None)
    if pgd:
        lines += [
            "",
            f"PGD accuracy: {pgd['steps']}-step {pgd['norm']} attack, eps={pgd['eps']:g}, on "
            f"{pgd['images']} validation crops.",
        ]
    if report.get("shipped"):
        lines += [
            "",
            "The shipped rows are RFI's own pairs (`rfi weights show NAME`), trained for hours on one core and not by "
            "this run: their accuracies are from their cards (their own 48-px validation crops), and they are "
            "evaluated below on the same crops as this run's pairs.",
        ]
    lines += _evaluation_section(
        f"held-out crops of the embedded photos ({ev['num']} per scale, training size {ev['train_size']} px)",
        ev,
        Path("."),
    )
    if report.get("evaluation_unseen"):
        unseen = report["evaluation_unseen"]
        held = {(n, r["scale"]): r["psnr"] for n, rs in ev["models"].items() for r in rs}
        gaps = [
            f"{n} {r['scale']}x {held[n, r['scale']] - r['psnr']:+.2f} dB"
            for n, rs in unseen["models"].items()
            for r in rs
            if (n, r["scale"]) in held
        ]
        lines += _evaluation_section(
            f"unseen images ({unseen['num']} crops per scale of images no model trained on, encoders/data/unseen.py)",
            unseen,
            Path("unseen"),
            f"Held-out minus unseen PSNR: {', '.join(gaps)}.",
        )
    return "\n".join(lines)


def _evaluation_section(title: str, ev: dict[str, Any], grid_folder: Path, note: str = "") -> list[str]:
    """One evaluation's table, robust-minus-standard PSNR, ``note`` and grids (``grid_folder``: relative
    to report.md)."""
    lines = ["", f"## Inversion on {title}", "", format_table(ev), ""]
    rows = {n: {r["scale"]: r for r in rs} for n, rs in ev["models"].items()}
    if set(RUN_NAMES) <= set(rows):
        gaps = [
            f"{s}x: {rows['robust'][s]['psnr'] - rows['standard'][s]['psnr']:+.2f} dB"
            for s in sorted(rows["robust"])
            if s in rows["standard"]
        ]
        lines += [f"Robust minus standard PSNR: {', '.join(gaps)}.", ""]
    lines += [note, ""] if note else []
    lines += [ev["lpips"] + ".", ""]
    for scale, path in ev["grids"].items():
        lines += [
            f"### {scale}: original | {' | '.join(ev['models'])}",
            "",
            f"![{scale} grid]({(grid_folder / Path(path).name).as_posix()})",
            "",
        ]
    return lines
