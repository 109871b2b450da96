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
    rfi quickstart --out runs/quickstart            # about 8 minutes on 2 idle CPU cores
    rfi quickstart --out /tmp/qs --budget tiny      # a smoke test of a few seconds
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from encoders.config import config_to_dict, load_config
from encoders.errors import RFIError
from encoders.files import check_output_folder
from encoders.runtime import resolve_device
from encoders.serialization import atomic_write, load_checkpoint
from inversion import RobustAutoencoder
from inversion.evaluate import compare_autoencoders, format_table, lpips_for, write_json

log = logging.getLogger("rfi")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
RUN_NAMES = ("standard", "robust")  # column order of the grids: original | standard | robust


@dataclass
class RunSection:
    """One encoder config and the decoder config trained on it (paths relative to the quickstart YAML)."""

    encoder: str = ""
    decoder: str = ""


@dataclass
class RunsSection:
    standard: RunSection = field(default_factory=lambda: RunSection(
        "encoder/resnet18_standard.yaml", "decoder/resnet18_standard_layer3.yaml"))
    robust: RunSection = field(default_factory=lambda: RunSection(
        "encoder/resnet18_robust.yaml", "decoder/resnet18_robust_layer3.yaml"))


@dataclass
class EvalSection:
    """Held-out evaluation: ``num`` embedded validation crops per scale (multiples of the training size)."""

    scales: list[int] = field(default_factory=lambda: [1, 2, 4])
    num: int = 100
    seed: int = 0
    grid_rows: int = 6
    lpips_net: str = "alex"
    lpips_weights: str | None = None


@dataclass
class QuickstartConfig:
    """``configs/quickstart.yaml``: the two runs, the budgets (config overrides) and the evaluation.

    ``budgets``: ``{name: {"encoder": [key=value, ...], "decoder": [...]}}`` applied on top of
    the runs' configs; ``budget`` picks one (``--budget`` overrides it).
    """

    runs: RunsSection = field(default_factory=RunsSection)
    budget: str = "default"
    budgets: dict[str, Any] = field(default_factory=lambda: {"default": {"encoder": [], "decoder": []}})
    eval: EvalSection = field(default_factory=EvalSection)
    device: str = "auto"


def _budget(cfg: QuickstartConfig, name: str, source: str) -> dict[str, list[str]]:
    """The budget's ``{"encoder": [...], "decoder": [...], "eval": [...]}`` lists of ``key=value``."""
    if name not in cfg.budgets:
        raise RFIError(f"unknown budget '{name}' in {source} (valid: {', '.join(cfg.budgets)})")
    spec = cfg.budgets[name] or {}
    if not isinstance(spec, dict) or set(spec) - {"encoder", "decoder", "eval"}:
        raise RFIError(f"budgets.{name} in {source} may only hold encoder, decoder and eval lists of key=value")
    lists = {k: spec.get(k) or [] for k in ("encoder", "decoder", "eval")}
    for key, items in lists.items():
        if not isinstance(items, list) or not all(isinstance(i, str) and "=" in i for i in items):
            raise RFIError(f"budgets.{name}.{key} in {source} must be a list of key=value strings")
    return lists


def _config_hash(cfg: Any) -> str:
    d = config_to_dict(cfg)
    d.pop("out", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _train(kind: str, name: str, cfg: Any, root: Path, force: bool) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse) one run under ``root/<name>-<config hash>``; returns its checkpoint and a summary."""
    out = root / f"{name}-{_config_hash(cfg)}"
    cfg.out = str(out)
    if force and out.exists():
        shutil.rmtree(out)
    cached = (out / ("checkpoint.pt" if kind == "encoder" else "decoder.pt")).is_file()
    log.info("%s %s %s -> %s", "reusing/resuming" if cached else "training", name, kind, out)
    start = time.perf_counter()
    if kind == "encoder":
        from encoders.train import train_encoder

        path = train_encoder(cfg, resume=True)
    else:
        from inversion.train import train_decoder

        path = train_decoder(cfg, resume=True)
    return Path(path), {"path": str(path), "cached": cached, "seconds": time.perf_counter() - start}


def run_quickstart(out: str | os.PathLike, config: str | os.PathLike = DEFAULT_CONFIG, budget: str | None = None,
                   overrides: tuple[str, ...] = (), force: bool = False) -> dict[str, Any]:
    """Train (or reuse) both encoders and decoders, evaluate them, write the report; returns ``report.json``'s content.

    Args:
        out: output folder (caches, grids, ``report.md``, ``report.json``).
        config: the quickstart YAML.
        budget: a name in the YAML's ``budgets`` (default: its ``budget`` key).
        overrides: ``key=value`` overrides of the quickstart config.
        force: retrain even when finished runs with the same config are cached.
    """
    from encoders.train import TrainEncoderConfig
    from inversion.train import TrainDecoderConfig

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    out = Path(out)
    config = Path(config)
    cfg = load_config(QuickstartConfig, config, list(overrides))
    budget = budget or cfg.budget
    spec = _budget(cfg, budget, str(config))
    enc_over, dec_over = spec["encoder"], spec["decoder"]
    if spec["eval"]:  # the budget's evaluation settings, then the command line's overrides
        cfg = load_config(QuickstartConfig, config, [*(f"eval.{o}" for o in spec["eval"]), *overrides])
    if cfg.eval.num < 1 or not cfg.eval.scales:
        raise RFIError(f"eval.num must be >= 1 and eval.scales non-empty in {config}")
    runs = {name: getattr(cfg.runs, name) for name in RUN_NAMES}
    report: dict[str, Any] = {"budget": budget, "config": str(config), "runs": {}}
    device = f"device={cfg.device}"
    models: dict[str, RobustAutoencoder] = {}
    train_sizes = set()
    steps, total = 0, 2 * len(runs)
    for name, spec in runs.items():
        enc_cfg = load_config(TrainEncoderConfig, config.parent / spec.encoder, [*enc_over, device])
        steps += 1
        log.info("[%d/%d] %s encoder", steps, total, name)
        enc_path, enc_info = _train("encoder", name, enc_cfg, out / "encoders", force)
        dec_cfg = load_config(TrainDecoderConfig, config.parent / spec.decoder,
                              [*dec_over, device, f"encoder.checkpoint={enc_path}"])
        steps += 1
        log.info("[%d/%d] %s decoder for %s", steps, total, name, dec_cfg.encoder.layer)
        dec_path, dec_info = _train("decoder", name, dec_cfg, out / "decoders", force)
        enc_ckpt, dec_ckpt = load_checkpoint(enc_path), load_checkpoint(dec_path)
        enc_info["eval"] = enc_ckpt.get("eval")
        dec_info["val_psnr"] = dec_ckpt.get("val_psnr")
        report["runs"][name] = {"encoder": enc_info, "decoder": dec_info, "layer": dec_cfg.encoder.layer,
                                "adversarial": config_to_dict(enc_cfg)["adv"]}
        train_sizes.add(int(dec_ckpt.get("train_size") or dec_cfg.data.size))
        models[name] = RobustAutoencoder.from_checkpoints(enc_path, dec_path, device=resolve_device(cfg.device))
    if len(train_sizes) != 1:
        raise RFIError(f"the decoders were trained at different sizes {sorted(train_sizes)}: the comparison "
                       f"needs one data.size")
    train_size = train_sizes.pop()

    log.info("evaluating on %d held-out crops per scale at %s x %d px", cfg.eval.num,
             ", ".join(f"{s}" for s in cfg.eval.scales), train_size)
    lpips_model, note = lpips_for(cfg.eval.lpips_net, cfg.eval.lpips_weights, resolve_device(cfg.device))
    t_eval = time.perf_counter()
    result = compare_autoencoders(models, cfg.eval.scales, train_size, cfg.eval.num, cfg.eval.seed,
                                  lpips_model=lpips_model, lpips_note=note, grid_dir=out, grid_rows=cfg.eval.grid_rows)
    report["evaluation"] = result
    report["seconds"] = {"total": time.perf_counter() - t0, "evaluation": time.perf_counter() - t_eval}
    report["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "load_average_start": load_start, "load_average_end": os.getloadavg(),
                         "platform": platform.platform(), "torch": torch.__version__}
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
    lines = ["# RFI quickstart report", "",
             f"Budget `{report['budget']}` ({report['config']}); total {report['seconds']['total'] / 60:.1f} min "
             f"on {report['machine']['cpus']} CPUs (load average {report['machine']['load_average_start'][0]:.1f} "
             f"at start).", "", "## Encoders and decoders", "",
             "| run | encoder training | clean acc | PGD acc | decoder | decoder val PSNR (dB) | time |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        adv = r["adversarial"]
        kind = (f"PGD {adv['norm']} eps={adv['eps']:g}, {adv['steps']} steps" if adv["enabled"] else "standard")
        secs = r["encoder"]["seconds"] + r["decoder"]["seconds"]
        cached = " (cached)" if r["encoder"]["cached"] and r["decoder"]["cached"] else ""
        vp = r["decoder"]["val_psnr"]
        lines.append(f"| {name} | {kind} | {_fmt_acc(r['encoder']['eval'])} | {r['layer']} | "
                     f"{'n/a' if vp is None else f'{vp:.2f}'} | {secs / 60:.1f} min{cached} |")
    pgd = next((r["encoder"]["eval"] for r in report["runs"].values() if r["encoder"]["eval"]), None)
    if pgd:
        lines += ["", f"PGD accuracy: {pgd['steps']}-step {pgd['norm']} attack, eps={pgd['eps']:g}, on "
                      f"{pgd['images']} validation crops."]
    lines += ["", f"## Inversion on held-out crops ({ev['num']} per scale, training size {ev['train_size']} px)", "",
              format_table(ev), ""]
    rows = {n: {r["scale"]: r for r in rs} for n, rs in ev["models"].items()}
    if set(RUN_NAMES) <= set(rows):
        gaps = [f"{s}x: {rows['robust'][s]['psnr'] - rows['standard'][s]['psnr']:+.2f} dB"
                for s in sorted(rows["robust"]) if s in rows["standard"]]
        lines += [f"Robust minus standard PSNR: {', '.join(gaps)}.", ""]
    lines += [ev["lpips"] + ".", ""]
    for scale, path in ev["grids"].items():
        lines += [f"### {scale}: original | {' | '.join(ev['models'])}", "",
                  f"![{scale} grid]({Path(path).name})", ""]
    return "\n".join(lines)


def register_quickstart(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    parser.add_argument("--budget", help="a budget of the config: default (about 8 min on 2 idle CPU cores), "
                                         "small, tiny (a smoke test)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="quickstart YAML (default: the shipped one)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="quickstart config overrides, e.g. eval.num=50 device=cpu")
    parser.add_argument("--force", action="store_true", help="retrain even if cached runs exist")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out)  # a file in the way or a read-only place: one line, before any training
    report = run_quickstart(args.out, args.config, args.budget, tuple(args.overrides), args.force)
    print(format_table(report["evaluation"]))
    print(report["evaluation"]["lpips"])
    print(f"report: {Path(args.out) / 'report.md'} ({report['seconds']['total'] / 60:.1f} min)")
    return 0
