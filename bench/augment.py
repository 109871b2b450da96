"""SASSL benchmark: MoCo v2 and SimCLR with and without StyleAugment, linear probes on several tasks,
paired by seed; and the step time of synchronous vs asynchronous stylisation next to the plain pipeline.

For every seed and method (``simclr``, ``mocov2``), three pipelines train the same SSL run
(``configs/apps/ssl.yaml`` plus ``--set`` overrides and ``--steps``), interleaved:

- ``plain``: the standard views (random resized crop + flip, colour jitter, grayscale);
- ``sassl``: + StyleAugment with SASSL's setting, alpha, beta ~ U(0.1, 0.3);
- ``today``: + StyleAugment with the previous SSL default, alpha, beta ~ U(0.2, 0.6).

All three of a seed share initialisation, data order, crops and colour-jitter draws
(views are drawn from per-batch generators; StyleAugment has its own), so differences are
paired. Each backbone is scored by linear probes (logistic regression on frozen pooled
features, train-region crops -> held-out-region crops) on every task of
:data:`apps.ssl.probes.PROBE_TASKS`; the untrained backbone of each seed and a probe on colour
statistics alone (per-channel mean, sd, 8-bin histogram) are scored as floors. For each task
and style pipeline: mean, sd, and the paired difference to ``plain`` with its 95 % t-interval.

Timing: per method, ``--timing-rounds`` rounds of three ``--timing-steps``-step runs each
(plain; StyleAugment in the training loop; StyleAugment in a background thread,
:class:`apps.style.loader.StyledLoader`), interleaved in the same process; median step times.

    python bench/augment.py --encoder ENC.pt --decoder DEC.pt --seeds 10 --steps 30 --threads 1
    python bench/augment.py --train-missing ...   # trains the default robust encoder + decoder first

Writes ``bench/results/augment.json`` after every run (``"complete": false`` until the end).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.ssl import SSLConfig, linear_probe, run_ssl
from apps.ssl.methods import build_model
from apps.ssl.probes import PROBE_TASKS
from apps.ssl.train import train_ssl
from apps.style.augment import (
    DEFAULT_DECODER,
    DEFAULT_ENCODER,
    StyleAugment,
    load_style_model,
)
from encoders.core.config import config_to_dict, load_config
from encoders.core.errors import RFIError
from encoders.core.runtime import seed_everything
from encoders.core.serialization import write_json

ROOT = Path(__file__).resolve().parents[1]
SSL_CONFIG = ROOT / "configs" / "apps" / "ssl.yaml"
ENCODER_CONFIG = ROOT / "configs" / "encoder" / "resnet18_robust.yaml"
DECODER_CONFIG = ROOT / "configs" / "decoder" / "resnet18_robust_layer3.yaml"
PIPELINES = {"plain": None, "sassl": [0.1, 0.3], "today": [0.2, 0.6]}
GOAL_ASYNC_OVERHEAD = 0.05


def train_missing_defaults() -> None:
    """Train the default robust encoder and its layer3 decoder where their files are missing."""
    if not DEFAULT_ENCODER.is_file():
        from encoders.robust.train import TrainEncoderConfig, train_encoder

        print(f"training the default robust encoder -> {DEFAULT_ENCODER.parent}", flush=True)
        train_encoder(load_config(TrainEncoderConfig, ENCODER_CONFIG, [f"out={DEFAULT_ENCODER.parent}"]))
    if not DEFAULT_DECODER.is_file():
        from inversion.train import TrainDecoderConfig, train_decoder

        print(f"training its layer3 decoder -> {DEFAULT_DECODER.parent}", flush=True)
        train_decoder(
            load_config(
                TrainDecoderConfig,
                DECODER_CONFIG,
                [f"out={DEFAULT_DECODER.parent}", f"encoder.checkpoint={DEFAULT_ENCODER}"],
            )
        )


def t_interval(diffs: list[float]) -> dict[str, float]:
    """Mean, sd and the 95 % t confidence interval of paired differences."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else float("nan")
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "ci95": [mean - half, mean + half],
        "excludes_zero": bool(n > 1 and (mean - half > 0 or mean + half < 0)),
    }


def mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "mean": statistics.mean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
    }


def summarise(runs: dict, methods: list[str], tasks: list[str]) -> dict:
    """Per method, pipeline and task: mean, sd; per style pipeline: the paired difference to plain."""
    out: dict = {
        "untrained": {t: mean_sd([r["probe"][t] for r in runs["untrained"]]) for t in tasks}
        if runs["untrained"]
        else {}
    }
    for m in methods:
        out[m] = {}
        for name in runs[m]:
            rs = runs[m][name]
            if not rs:
                continue
            row = {t: mean_sd([r["probe"][t] for r in rs]) for t in tasks}
            row["step_ms_median"] = statistics.median(r["step_ms"] for r in rs)
            if name != "plain":
                plain = {r["seed"]: r for r in runs[m]["plain"]}
                pairs = [(r, plain[r["seed"]]) for r in rs if r["seed"] in plain]
                if len(pairs) > 1:
                    row["paired_gain"] = {
                        t: t_interval([a["probe"][t] - b["probe"][t] for a, b in pairs]) for t in tasks
                    }
            out[m][name] = row
    return out


def timing(
    base: list[str], style_keys: list[str], methods: list[str], steps: int, rounds: int, style: StyleAugment, work: Path
) -> dict:
    """Median step time: plain, StyleAugment in the loop, StyleAugment in a background thread (runs in ``work``)."""
    modes = {
        "plain": [],
        "sync": ["style.enabled=true", "style.background=false", *style_keys],
        "async": ["style.enabled=true", "style.background=true", *style_keys],
    }
    out = {}
    for m in methods:
        per: dict[str, list[dict]] = {k: [] for k in modes}
        for r in range(rounds):
            for mode, extra in modes.items():
                cfg = load_config(
                    SSLConfig,
                    SSL_CONFIG,
                    [
                        *base,
                        f"method={m}",
                        f"steps={steps}",
                        "seed=0",
                        "probe.enabled=false",
                        f"out={work / f'{m}_{r}_{mode}'}",
                        *extra,
                    ],
                )
                stats = train_ssl(cfg, style=style if cfg.style.enabled else None).metrics
                per[mode].append(stats)
                print(
                    f"timing {m:<7} round {r + 1} {mode:<6} step {stats['step_ms']:.0f} ms  style "
                    f"{stats['style_ms']:.0f} ms  wait {stats['wait_ms']:.0f} ms  training-thread CPU "
                    f"{stats['main_cpu_ms']:.0f} ms",
                    flush=True,
                )
        keys = ("step_ms", "style_ms", "wait_ms", "main_cpu_ms")
        row = {mode: {k: statistics.median(s[k] for s in v) for k in keys} for mode, v in per.items()}
        row["rounds"] = {mode: [{k: s[k] for k in keys} for s in v] for mode, v in per.items()}
        for k in ("sync", "async"):
            row[f"{k}_overhead"] = row[k]["step_ms"] / row["plain"]["step_ms"] - 1
            row[f"{k}_cpu_overhead"] = row[k]["main_cpu_ms"] / row["plain"]["main_cpu_ms"] - 1
        out[m] = row
    return out


def print_tables(summary: dict, floors: dict, speed: dict, methods: list[str], tasks: list[str], header: str) -> None:
    print("\n" + header)
    head = f"{'method':<8} {'pipeline':<9} " + " ".join(f"{t:>24}" for t in tasks)
    print(head)
    print("-" * len(head))
    print(f"{'-':<8} {'colour stats':<9} " + " ".join(f"{100 * floors[t]:>23.1f}%" for t in tasks))
    if summary.get("untrained"):
        untrained = summary["untrained"]
        print(
            f"{'-':<8} {'untrained':<9} "
            + " ".join(f"{100 * untrained[t]['mean']:>15.1f} ± {100 * untrained[t]['sd']:4.1f}%" for t in tasks)
        )
    for m in methods:
        for name, row in summary.get(m, {}).items():
            cells = [f"{100 * row[t]['mean']:>15.1f} ± {100 * row[t]['sd']:4.1f}%" for t in tasks]
            print(f"{m:<8} {name:<9} " + " ".join(cells))
            if "paired_gain" in row:
                gains = []
                for t in tasks:
                    g = row["paired_gain"][t]
                    lo, hi = (100 * v for v in g["ci95"])
                    gains.append(f"{100 * g['mean']:+.1f} [{lo:+.1f},{hi:+.1f}]{'*' if g['excludes_zero'] else ' '}")
                print(f"{'':<8} {'  gain':<9} " + " ".join(f"{c:>24}" for c in gains))
    print("(gain: paired difference to plain, points, [95 % t-interval]; * = the interval excludes 0)")
    if speed:
        print("\nstep time (median ms): plain | StyleAugment in the loop | in a background thread")
        for m, row in speed.items():
            met = "met" if row["async_overhead"] <= GOAL_ASYNC_OVERHEAD else "NOT met"
            print(
                f"{m:<8} {row['plain']['step_ms']:7.0f} | {row['sync']['step_ms']:7.0f} "
                f"({100 * row['sync_overhead']:+.0f}%) | {row['async']['step_ms']:7.0f} "
                f"({100 * row['async_overhead']:+.0f}%; goal <= {100 * GOAL_ASYNC_OVERHEAD:.0f}%: {met})"
                f"  StyleAugment {row['sync']['style_ms']:.0f} ms/step"
            )
            print(
                f"{'':<8} training-thread CPU per step: {row['plain']['main_cpu_ms']:7.0f} | "
                f"{row['sync']['main_cpu_ms']:7.0f} ({100 * row['sync_cpu_overhead']:+.0f}%) | "
                f"{row['async']['main_cpu_ms']:7.0f} ({100 * row['async_cpu_overhead']:+.0f}%)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="seeds (each: one run per method and pipeline)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30, help="SSL steps per run (the same for every pipeline)")
    parser.add_argument("--methods", default="simclr,mocov2")
    parser.add_argument(
        "--pipelines",
        default=",".join(PIPELINES),
        help=f"pipelines to train per seed and method (of {', '.join(PIPELINES)}; plain is required)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override configs/apps/ssl.yaml (repeatable), e.g. --set batch_size=64",
    )
    parser.add_argument("--model", help="style autoencoder file (RobustAutoencoder.save)")
    parser.add_argument("--encoder", help="style encoder checkpoint (with --decoder)")
    parser.add_argument("--decoder", help="style decoder checkpoint (with --encoder)")
    parser.add_argument(
        "--train-missing",
        action="store_true",
        help="train the default robust encoder / decoder first if their files are missing",
    )
    parser.add_argument("--timing-steps", type=int, default=12, help="steps per timing run (0: no timing)")
    parser.add_argument("--timing-rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training loop")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "augment.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    if bool(args.encoder) != bool(args.decoder):
        parser.error("--encoder and --decoder go together")
    if not (args.model or args.encoder) and args.train_missing:
        train_missing_defaults()
    style_keys = (
        [f"style.model={args.model}"]
        if args.model
        else [f"style.encoder={args.encoder}", f"style.decoder={args.decoder}"]
        if args.encoder
        else [f"style.encoder={DEFAULT_ENCODER}", f"style.decoder={DEFAULT_DECODER}"]
    )
    methods = args.methods.split(",")
    pipelines = {name: PIPELINES[name] for name in args.pipelines.split(",")}
    if "plain" not in pipelines:
        parser.error("--pipelines must include plain (the paired baseline)")
    base = [*args.set, f"steps={args.steps}"]
    try:
        autoencoder = load_style_model(
            args.model or (args.encoder, args.decoder) if (args.model or args.encoder) else None
        )
        cfg0 = load_config(SSLConfig, SSL_CONFIG, [*base, *style_keys])
    except RFIError as e:
        print(f"bench/augment.py: {e}", file=sys.stderr)
        print("(or run: python bench/augment.py --train-missing)", file=sys.stderr)
        return 2
    tasks = list(cfg0.probe.tasks)
    # One StyleAugment (hence one autoencoder in memory) per alpha/beta setting, shared by the runs.
    styles = {
        name: StyleAugment(
            autoencoder,
            p=cfg0.style.p,
            alpha=ab,
            beta=ab,
            styles=cfg0.style.styles,
            style_size=cfg0.style.style_size,
            work_size=cfg0.style.work_size,
        )
        for name, ab in PIPELINES.items()
        if ab
    }

    work = tempfile.TemporaryDirectory(prefix="rfi-bench-augment-")  # the runs' folders, removed at the end
    runs_dir = Path(work.name)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    result = {
        "command": "python bench/augment.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "complete": False,
        "ssl_config": config_to_dict(cfg0),
        "pipelines": pipelines,
        "tasks": {t: PROBE_TASKS[t] for t in tasks},
        "style_model": {
            "model": args.model,
            "encoder": args.encoder or (None if args.model else str(DEFAULT_ENCODER)),
            "decoder": args.decoder or (None if args.model else str(DEFAULT_DECODER)),
        },
    }

    def save() -> None:
        result["environment"] = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_start": load_start,
            "load_average_now": os.getloadavg()[0],
            "wall_s": time.perf_counter() - started,
        }
        write_json(result, args.out)

    floors = linear_probe(None, cfg0)
    result["colour_stats_probe"] = floors
    print("colour-statistics probe: " + ", ".join(f"{t} {100 * a:.1f}%" for t, a in floors.items()), flush=True)
    speed = (
        timing(base, style_keys, methods, args.timing_steps, args.timing_rounds, styles["sassl"], runs_dir / "timing")
        if args.timing_steps
        else {}
    )
    result["timing"] = speed
    save()

    runs: dict = {"untrained": [], **{m: {name: [] for name in pipelines} for m in methods}}
    result["runs"] = runs
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = load_config(SSLConfig, SSL_CONFIG, [*base, f"seed={seed}"])
        seed_everything(seed)
        runs["untrained"].append({"seed": seed, "probe": linear_probe(build_model(cfg).eval(), cfg)})
        for m in methods:
            for name, ab in pipelines.items():
                extra = (
                    []
                    if ab is None
                    else [
                        "style.enabled=true",
                        "style.background=false",
                        *style_keys,
                        f"style.alpha={ab}",
                        f"style.beta={ab}",
                    ]
                )
                cfg = load_config(
                    SSLConfig,
                    SSL_CONFIG,
                    [*base, f"method={m}", f"seed={seed}", *extra, f"out={runs_dir / f'{m}_{name}_{seed}'}"],
                )
                r = {"seed": seed, **run_ssl(cfg, style=styles.get(name))}
                runs[m][name].append(r)
                print(
                    f"seed {seed} {m:<7} {name:<6} "
                    + " ".join(f"{t} {100 * a:.1f}%" for t, a in r["probe"].items())
                    + f"  step {r['step_ms']:.0f} ms  loss {r['loss_first']:.2f} -> {r['loss_last']:.2f}",
                    flush=True,
                )
                result["summary"] = summarise(runs, methods, tasks)
                save()
    result["complete"] = True
    result["summary"] = summarise(runs, methods, tasks)
    save()
    c = cfg0
    header = (
        f"{', '.join(methods)}: {args.steps} steps of {c.batch_size} images ({c.data.view_size}-px views, "
        f"{c.model.arch} width {c.model.width}), {args.seeds} seeds; StyleAugment p={c.style.p:g} on both views "
        f"at {c.style.position}; linear-probe accuracy on held-out regions (mean ± sd)"
    )
    print_tables(result["summary"], floors, speed, methods, tasks, header)
    print(f"wrote {args.out}")
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
