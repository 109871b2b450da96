"""SASSL at a budget where augmentations matter: 10 seeds, paired, 1,800 steps, with a learning curve and an ablation.

Per seed (the same initialisation, data order, crops and colour draws for every variant of a seed,
so differences are paired), MoCo v2 and SimCLR train ``configs/apps/ssl.yaml`` at the bench's sizes
(:data:`REAL`; ``--tiny``: :data:`TINY`):

- ``plain``: the standard views; ``sassl``: + StyleAugment at SASSL's setting (the SSL config's
  ``style`` section: alpha, beta ~ U(0.1, 0.3), p 0.5, styles from the batch, after the crop), stylised
  asynchronously (:class:`apps.style.loader.StyledLoader` in a worker thread), as SASSL does;
- the ablation SASSL's reviewers asked about (MoCo v2 only): ``full`` (alpha = beta = 1: full
  stylisation), ``p0.8`` and ``p1`` (augmentation probability 0.8 and 1 instead of 0.5).

Every run keeps its backbone at :data:`CURVE` steps (``snapshot_steps``); each snapshot is scored by
the linear probes of :data:`apps.ssl.probes.PROBE_TASKS` (``photo``; ``photo_grey`` and ``texture``,
which colour statistics cannot solve; ``unseen``, a transfer task on images the SSL run never saw),
so the learning curve of the gain comes from the same runs. The report gives, per task, mean ± sd
and the paired gain over ``plain`` with its 95 % t-interval (its half-width: the smallest gain the
experiment could have detected), at every curve step; it plots the curve to ``docs/img/sassl_curve.png``.

Resumable and shardable: every finished (method, variant, seed) is cached with its probes in
``--workdir/results``; an interrupted SSL run continues from its last checkpoint (``--resume`` of the
scaffold). Two processes split the work, and a third call merges::

    OMP_NUM_THREADS=1 python bench/sassl_budget.py --workdir runs/sassl_budget --shard 0/2 &
    OMP_NUM_THREADS=1 python bench/sassl_budget.py --workdir runs/sassl_budget --shard 1/2 &
    wait; python bench/sassl_budget.py --workdir runs/sassl_budget --report
    python bench/sassl_budget.py --tiny --workdir /tmp/sassl_tiny     # the whole pipeline in seconds

The style model is ``--pyramid PATH`` (a ``RobustAutoencoder.save`` file, e.g. a decoder pyramid of
``rfi style train``, or ``shipped:NAME``); by default RFI's shipped style pyramid
(``shipped:rfi_style_pyramid``) when this build ships it, otherwise the default robust autoencoder
(trained first when missing, :func:`bench.augment.train_missing_defaults`). Writes
``bench/results/sassl_budget.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.ssl import SSLConfig, linear_probe
from apps.ssl.methods import build_model
from apps.ssl.probes import PROBE_TASKS
from apps.ssl.train import snapshot_path, train_ssl
from apps.style.augment import DEFAULT_DECODER, DEFAULT_ENCODER, StyleAugment, load_style_model
from bench.augment import mean_sd, t_interval, train_missing_defaults
from encoders.core.config import load_config
from encoders.core.errors import RFIError
from encoders.core.runtime import seed_everything
from encoders.core.serialization import load_checkpoint, write_json
from encoders.weights.shipped import SHIPPED, get_shipped, status

ROOT = Path(__file__).resolve().parents[1]
SSL_CONFIG = ROOT / "configs" / "apps" / "ssl.yaml"

CURVE = (30, 60, 120, 450, 900, 1800)
"""Steps at which every run's backbone is probed (the last: the run's budget)."""
REAL = (
    "batch_size=32",
    "data.crop_size=24",
    "data.view_size=16",
    "model.width=0.125",
    "moco.queue=512",
    "probe.train_crops=600",
    "probe.val_crops=400",
    "checkpoint_every=150",
    "log_every=50",
    "device=cpu",
    "style.background=true",
    "style.threads=1",
)
"""The bench's sizes (docs/ssl.md, "SASSL at 1,800+ steps": chosen from a measured step time)."""
TINY_CURVE = (3, 6)
TINY = (
    "data.crops=64",
    "data.crop_size=20",
    "data.view_size=16",
    "model.width=0.125",
    "batch_size=16",
    "moco.queue=32",
    "probe.train_crops=48",
    "probe.val_crops=32",
    "checkpoint_every=3",
    "log_every=0",
    "device=cpu",
)
"""``--tiny``: the whole pipeline in seconds (tests/bench/test_sassl_budget.py)."""

VARIANTS: dict[str, list[str] | None] = {
    "plain": None,
    "sassl": [],
    "full": ["style.alpha=[1.0,1.0]", "style.beta=[1.0,1.0]"],
    "p0.8": ["style.p=0.8"],
    "p1": ["style.p=1.0"],
}
"""Variant -> its StyleAugment overrides of the config's SASSL setting (``None``: no StyleAugment)."""
MAIN = {"simclr": ("plain", "sassl"), "mocov2": ("plain", "sassl", "full", "p0.8", "p1")}
"""Method -> the variants it trains (the ablation on MoCo v2 only)."""


SHIPPED_PYRAMID = "rfi_style_pyramid"


def default_pyramid() -> str | None:
    """``shipped:rfi_style_pyramid`` when this build ships it (present, hash checked), else ``None``."""
    return f"shipped:{SHIPPED_PYRAMID}" if status(get_shipped(SHIPPED_PYRAMID)) == SHIPPED else None


def jobs(seeds: list[int]) -> list[tuple[str, str, int]]:
    """Every (method, variant, seed) of the bench, seed by seed (``untrained``: the seed's initial backbone)."""
    out = []
    for seed in seeds:
        out.append(("untrained", "-", seed))
        out.extend((m, v, seed) for m, variants in MAIN.items() for v in variants)
    return out


def job_name(method: str, variant: str, seed: int) -> str:
    return f"{method}_{variant}_s{seed}" if method != "untrained" else f"untrained_s{seed}"


def run_config(base: list[str], method: str, variant: str, seed: int, workdir: Path, style_keys: list[str]) -> Any:
    """The SSL config of one run (its folder: ``workdir/runs/<job>``)."""
    extra = [] if VARIANTS[variant] is None else ["style.enabled=true", *style_keys, *VARIANTS[variant]]
    name = job_name(method, variant, seed)
    return load_config(
        SSLConfig, SSL_CONFIG, [*base, f"method={method}", f"seed={seed}", *extra, f"out={workdir / 'runs' / name}"]
    )


def probe_snapshot(cfg: Any, step: int) -> dict[str, float]:
    """Linear-probe accuracy per task of the run's backbone at ``step`` (its ``checkpoint_step<step>.pt``)."""
    model = build_model(cfg)
    model.backbone.load_state_dict(load_checkpoint(snapshot_path(cfg.out, step))["state_dict"])
    return linear_probe(model.eval(), cfg)


def run_job(
    job: tuple[str, str, int], base: list[str], workdir: Path, style_keys: list[str], styles: dict[str, StyleAugment]
) -> dict[str, Any]:
    """Train (or resume) one run and probe its snapshots; cached in ``workdir/results/<job>.json``."""
    method, variant, seed = job
    cached = workdir / "results" / f"{job_name(*job)}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if method == "untrained":
        cfg = load_config(SSLConfig, SSL_CONFIG, [*base, f"seed={seed}"])
        seed_everything(seed)
        record: dict[str, Any] = {"curve": {"0": linear_probe(build_model(cfg).eval(), cfg)}}
    else:
        cfg = run_config(base, method, variant, seed, workdir, style_keys)
        resume = (Path(cfg.out) / "checkpoint.pt").is_file()
        stats = train_ssl(cfg, resume=resume, style=styles.get(variant)).metrics
        record = {"stats": stats, "curve": {str(s): probe_snapshot(cfg, s) for s in cfg.snapshot_steps}}
    record.update(
        method=method, variant=variant, seed=seed, cpu_s=time.process_time() - cpu0, wall_s=time.perf_counter() - wall0
    )
    write_json(record, cached)
    return record


# ----------------------------------------------------------------------------- the report
def summarise(records: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """Per method, variant and curve step: accuracy (mean ± sd) per task and, for styled variants, the paired
    gain over ``plain`` with its 95 % t-interval and ``detectable`` (the interval's half-width)."""
    by: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in records:
        by.setdefault((r["method"], r["variant"]), {})[r["seed"]] = r
    out: dict[str, Any] = {}
    order = [("untrained", "-")] + [(m, v) for m, variants in MAIN.items() for v in variants]
    for method, variant in [key for key in order if key in by]:
        runs = by[(method, variant)]
        steps = sorted({int(s) for r in runs.values() for s in r["curve"]})
        rows = {}
        for step in steps:
            have = {seed: r["curve"][str(step)] for seed, r in runs.items() if str(step) in r["curve"]}
            row: dict[str, Any] = {t: mean_sd([p[t] for p in have.values()]) for t in tasks}
            plain = by.get((method, "plain"), {})
            pairs = [(p, plain[s]["curve"][str(step)]) for s, p in have.items() if s in plain]
            if variant not in ("plain", "-") and len(pairs) > 1:
                row["gain"] = {}
                for t in tasks:
                    g = t_interval([a[t] - b[t] for a, b in pairs])
                    g["detectable"] = (g["ci95"][1] - g["ci95"][0]) / 2
                    row["gain"][t] = g
            rows[str(step)] = row
        out.setdefault(method, {})[variant] = rows
    return out


def plot_curve(summary: dict[str, Any], tasks: list[str], path: Path) -> None:
    """The paired gain (points, 95 % interval) against training steps, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({int(s) for variants in summary.values() for rows in variants.values() for s in rows if s != "0"})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, variants in summary.items():
            for variant, rows in variants.items():
                pts = [(int(s), row["gain"][task]) for s, row in rows.items() if "gain" in row]
                if not pts or (method == "mocov2" and variant not in ("sassl", "full")):
                    continue
                x = [s for s, _ in pts]
                ax.plot(x, [100 * g["mean"] for _, g in pts], marker="o", label=f"{method} {variant}")
                ax.fill_between(
                    x, [100 * g["ci95"][0] for _, g in pts], [100 * g["ci95"][1] for _, g in pts], alpha=0.15
                )
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
        ax.set_title(task)
        ax.set_xlabel("training steps")
    axes[0][0].set_ylabel("gain over plain (points, 95 % CI)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def final_rows(summary: dict[str, Any], final: int) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(method, variant, row at step ``final``; the untrained backbone's at step 0) of the report's tables."""
    for method, variants in summary.items():
        for variant, rows in variants.items():
            row = rows.get(str(final)) or rows.get("0")
            if row is not None:
                yield method, variant, row


def print_report(summary: dict[str, Any], floors: dict[str, float], tasks: list[str], final: int) -> None:
    """The table at the final step and the curve of the gains."""
    print(f"\nlinear-probe accuracy at step {final} (mean ± sd over seeds); gain: paired, points [95 % CI]")
    print(f"{'method':<10}{'variant':<9}" + "".join(f"{t:>26}" for t in tasks))
    print(f"{'-':<10}{'colour':<9}" + "".join(f"{100 * floors[t]:>25.1f}%" for t in tasks))
    for method, variant, row in final_rows(summary, final):
        cells = "".join(f"{100 * row[t]['mean']:>17.1f} ± {100 * row[t]['sd']:4.1f}%" for t in tasks)
        print(f"{method:<10}{variant:<9}{cells}")
        if "gain" in row:
            gains = [row["gain"][t] for t in tasks]
            cells = "".join(
                f"{100 * g['mean']:+9.1f} [{100 * g['ci95'][0]:+.1f},{100 * g['ci95'][1]:+.1f}]"
                f"{'*' if g['excludes_zero'] else ' '}".rjust(26)
                for g in gains
            )
            print(f"{'':<10}{'gain':<9}{cells}")
    print("\ngain over plain against steps (points; ±: the interval's half-width, the smallest gain detectable)")
    for method, variants in summary.items():
        for variant, rows in variants.items():
            for step, row in rows.items():
                if "gain" in row:
                    cells = "".join(
                        f"{100 * row['gain'][t]['mean']:+8.1f} ± {100 * row['gain'][t]['detectable']:.1f}".rjust(26)
                        for t in tasks
                    )
                    print(f"{method:<10}{variant:<9}{step:>6}{cells}")


METHOD_NAMES = {"untrained": "–", "simclr": "SimCLR", "mocov2": "MoCo v2"}
VARIANT_NAMES = {
    "-": "untrained backbone",
    "plain": "plain",
    "sassl": "+ StyleAugment (SASSL)",
    "full": "full stylisation (α = β = 1)",
    "p0.8": "p = 0.8",
    "p1": "p = 1",
}


def markdown_report(summary: dict[str, Any], floors: dict[str, float], tasks: list[str], final: int) -> str:
    """The tables of docs/ssl.md: accuracy and paired gain at step ``final``; the gain of SASSL's setting per step
    (mean ± the interval's half-width; ``*``: the 95 % interval excludes zero)."""

    def gain(g: dict[str, Any], interval: bool) -> str:
        star = "*" if g["excludes_zero"] else ""
        if interval:
            return f"{100 * g['mean']:+.1f} [{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}]{star}"
        return f"{100 * g['mean']:+.1f} ± {100 * g['detectable']:.1f}{star}"

    lines = [
        f"| method | variant | {' | '.join(tasks)} |",
        "|---|---|" + "---|" * len(tasks),
        "| – | colour statistics | " + " | ".join(f"{100 * floors[t]:.1f}" for t in tasks) + " |",
    ]
    for method, variant, row in final_rows(summary, final):
        cells = " | ".join(f"{100 * row[t]['mean']:.1f} ± {100 * row[t]['sd']:.1f}" for t in tasks)
        lines.append(f"| {METHOD_NAMES[method]} | {VARIANT_NAMES[variant]} | {cells} |")
        if "gain" in row:
            lines.append("| | gain [95 % CI] | " + " | ".join(gain(row["gain"][t], True) for t in tasks) + " |")
    steps = sorted({int(s) for v in summary.values() for rows in v.values() for s in rows if s != "0"})
    lines += [
        "",
        f"| method, variant | task | {' | '.join(f'{s:,}' for s in steps)} |",
        "|---|---|" + "---|" * len(steps),
    ]
    for method, variants in summary.items():
        rows = variants.get("sassl", {})
        for t in tasks:
            cells = [gain(rows[str(s)]["gain"][t], False) if "gain" in rows.get(str(s), {}) else "" for s in steps]
            if any(cells):
                lines.append(f"| {METHOD_NAMES[method]} + SASSL | {t} | {' | '.join(cells)} |")
    return "\n".join(lines)


def report(workdir: Path, out: Path, plot: Path, tasks: list[str], final: int, meta: dict[str, Any]) -> dict:
    """Merge every cached result of ``workdir`` into the summary, the JSON ``out`` and the plot ``plot``."""
    records = [json.loads(p.read_text()) for p in sorted((workdir / "results").glob("*_s*.json"))]
    floors = json.loads((workdir / "results" / "colour.json").read_text())
    summary = summarise(records, tasks)
    trained = [r for r in records if r["method"] != "untrained"]
    result = {
        **meta,
        "runs": len(trained),
        "complete": len(records) == meta["jobs"],
        "cpu_hours": sum(r["cpu_s"] for r in records) / 3600,
        "tasks": {t: PROBE_TASKS[t] for t in tasks},
        "colour_stats_probe": floors,
        "summary": summary,
    }
    write_json(result, out)
    plot_curve(summary, tasks, plot)
    print_report(summary, floors, tasks, final)
    print("\nthe tables of docs/ssl.md:\n\n" + markdown_report(summary, floors, tasks, final))
    print(f"\n{len(trained)} runs, {result['cpu_hours']:.2f} CPU-hours; wrote {out} and {plot}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/sassl_budget", help="runs and cached results (resumable)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--shard", default="0/1", help="k/n: this process takes jobs k, k + n, ... (e.g. 0/2, 1/2)")
    parser.add_argument("--report", action="store_true", help="only merge the cached results into the report")
    parser.add_argument(
        "--pyramid",
        help="the style model: a RobustAutoencoder.save file (a decoder pyramid) or shipped:NAME "
        "(default: shipped:rfi_style_pyramid when this build has it, else the default robust autoencoder)",
    )
    parser.add_argument("--tiny", action="store_true", help="the whole pipeline at tiny sizes, in seconds")
    parser.add_argument("--out", help="result JSON (default bench/results/sassl_budget.json; --tiny: in --workdir)")
    parser.add_argument("--plot", help="learning-curve PNG (default docs/img/sassl_curve.png; --tiny: in --workdir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    workdir = Path(args.workdir)
    k, n = (int(v) for v in args.shard.split("/"))
    if not 0 <= k < n:
        parser.error(f"--shard k/n needs 0 <= k < n, got {args.shard}")
    curve = TINY_CURVE if args.tiny else CURVE
    base = [
        *(TINY if args.tiny else REAL),
        f"steps={curve[-1]}",
        f"snapshot_steps={list(curve)}",
        "probe.enabled=false",
    ]
    out = Path(args.out or (workdir / "sassl_budget.json" if args.tiny else ROOT / "bench/results/sassl_budget.json"))
    plot = Path(args.plot or (workdir / "sassl_curve.png" if args.tiny else ROOT / "docs/img/sassl_curve.png"))
    cfg0 = load_config(SSLConfig, SSL_CONFIG, base)
    tasks = list(cfg0.probe.tasks)
    all_jobs = jobs(list(range(args.seeds)))
    meta = {
        "command": "python bench/sassl_budget.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "overrides": base,
        "curve_steps": list(curve),
        "variants": VARIANTS,
        "methods": MAIN,
        "seeds": args.seeds,
        "jobs": len(all_jobs),
        "environment": {"torch": torch.__version__, "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if args.report:
        return report(workdir, out, plot, tasks, curve[-1], meta)

    if args.tiny and not args.pyramid:
        from encoders import create_encoder
        from inversion.autoencoder import RobustAutoencoder
        from inversion.decoders import Decoder

        torch.manual_seed(0)
        enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8)
        args.pyramid = str(RobustAutoencoder(enc, Decoder(32, 4, "layer3", channels=16)).save(workdir / "tiny_ae.pt"))
    args.pyramid = args.pyramid or default_pyramid()
    if args.pyramid:
        style_keys, model = [f"style.model={args.pyramid}"], args.pyramid
    else:
        train_missing_defaults()  # the strongest style model RFI trains without a shipped one
        style_keys = [f"style.encoder={DEFAULT_ENCODER}", f"style.decoder={DEFAULT_DECODER}"]
        model = (DEFAULT_ENCODER, DEFAULT_DECODER)
    try:
        autoencoder = load_style_model(model)
    except RFIError as e:
        parser.error(str(e))
    styles = {}
    for variant, extra in VARIANTS.items():
        if extra is not None:
            s = run_config(base, "mocov2", variant, 0, workdir, style_keys).style
            styles[variant] = StyleAugment(
                autoencoder, p=s.p, alpha=s.alpha, beta=s.beta, styles=s.styles, work_size=s.work_size
            )
    colour = workdir / "results" / "colour.json"
    if not colour.is_file():
        write_json(linear_probe(None, cfg0), colour)
    mine = [job for i, job in enumerate(all_jobs) if i % n == k]
    for i, job in enumerate(mine):
        r = run_job(job, base, workdir, style_keys, styles)
        last = r["curve"][max(r["curve"], key=int)]
        print(
            f"[{k}/{n}] {i + 1}/{len(mine)} {job_name(*job)}: "
            + " ".join(f"{t} {100 * a:.1f}%" for t, a in last.items())
            + f"  ({r['cpu_s']:.0f} CPU-s)",
            flush=True,
        )
    if n == 1:
        return report(workdir, out, plot, tasks, curve[-1], meta)
    print(f"shard {args.shard} done; merge with: python bench/sassl_budget.py --workdir {workdir} --report")
    return {"shard": args.shard, "jobs": len(mine)}


if __name__ == "__main__":
    main()
