"""Generalization benchmark: models trained on the photos only vs photos + synthetic images.

For each training set (``photos``: ``data.source=embedded``; ``mixed``: ``data.source=mixed``,
half synthetic images, :mod:`encoders.data.synthetic`) and each of ``--seeds`` training seeds, at
the same budget, with the library's own trainers:

- the standard and the robust ResNet-18 encoders (``configs/encoder/resnet18_*.yaml``,
  :func:`encoders.robust.train.train_encoder`) and one layer3 decoder each
  (``configs/decoder/resnet18_*_layer3.yaml``, :func:`inversion.train.train_decoder`);
  PSNR of the reconstructions (:func:`inversion.evaluate.compare_autoencoders`, what
  ``rfi evaluate --data embedded --data unseen`` runs) on **held-out** regions of the
  embedded photos and on **unseen** images (:mod:`encoders.data.unseen`), at 1x and 4x the
  training size;
- the blind denoiser (``configs/apps/denoise.yaml``, :func:`apps.denoise.train_denoiser`) on
  that run's robust encoder; PSNR at sigma 15 / 25 / 50 on held-out and unseen crops,
  against scikit-image's non-local means (sigma given, its ``h`` tuned on training-region
  crops) and BM3D when ``import bm3d`` works (both from ``bench/denoise.py``), on the same
  noisy images.

The data (crop positions, synthetic images) is the same for every seed; the seed changes
the training (initialisation, batch order, noise). Reported: per-seed values, medians, and
paired differences per seed (robust minus standard; mixed minus photos; ours minus NLM),
their medians, and the issue's goals (denoiser ahead of NLM on unseen images at sigma 25
and 50; the robust-minus-standard gain on unseen images at least that on held-out regions;
held-out minus unseen PSNR at most 2 dB for every model).

Budget ("full"): encoders 150 steps of 128 crops (1.6 epochs of 12000; the shipped default is 6),
decoders 250 steps of 64, denoisers 200 steps of 32 (48 px); 30 training runs in all. Measured with
``--estimate`` (2 threads, load 2.4): 0.36 / 1.61 s per standard / robust encoder step, 0.31 s per
decoder step, 0.59 s per denoiser step, so about 57 min of training on one 2-thread process, plus
under 2 min to generate the synthetic images and a few minutes of evaluation. Training the two
sets in two 1-thread processes at once (``--train-only photos`` and ``--train-only mixed``), then
one plain call that reuses them and evaluates, uses both cores better.

Usage:
    python bench/generalization.py              # 3 seeds, full budget (about an hour on 2 idle cores)
    python bench/generalization.py --train-only photos --threads 1 &   # the two sets side by side,
    python bench/generalization.py --train-only mixed --threads 1      # then the plain call evaluates
    python bench/generalization.py --tiny       # smoke test: tiny models, a few steps, 2 seeds
    python bench/generalization.py --estimate   # time a few steps of each full-budget job, project the total

Runs are kept in ``--workdir`` (one folder per budget), so a killed run resumes and a
finished one is reused. Prints tables and writes ``bench/results/generalization.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from apps.denoise import load_denoiser_config, train_denoiser
from bench.denoise import (
    BM3D_MISSING,
    CLASSICAL,
    bm3d_fn,
    noisy_images,
    ours_fn,
    to_numpy,
    to_tensor,
    tune_classical,
)
from encoders.core.config import load_config
from encoders.core.serialization import write_json
from encoders.robust.train import TrainEncoderConfig, train_encoder
from inversion import RobustAutoencoder
from inversion.evaluate import compare_autoencoders, held_out_images
from inversion.metrics import psnr
from inversion.train import TrainDecoderConfig, train_decoder

log = logging.getLogger("rfi")
KINDS = ("standard", "robust")
DATA = {"photos": ["data.source=embedded"], "mixed": ["data.source=mixed", "data.synthetic_ratio=0.5"]}
SETS = {"held-out": "embedded", "unseen": "unseen"}
NLM = "nlm (sigma given)"

# Overrides of the shipped configs per budget; "eval" sizes the evaluation.
BUDGETS: dict[str, dict[str, Any]] = {
    "full": {
        "encoder": ["steps=150", "data.val_crops=500", "eval.enabled=false"],
        "decoder": ["steps=250", "data.val_crops=200", "sample_every=0"],
        "denoiser": ["train.steps=200", "train.sample_every=0"],
        "eval": {"scales": [1, 4], "num": 100, "denoise_size": 128, "denoise_num": 16, "tune_crops": 8},
    },
    "tiny": {
        "encoder": [
            "data.size=16",
            "data.train_crops=256",
            "data.val_crops=64",
            "model.width=0.125",
            "steps=3",
            "batch_size=32",
            "eval.enabled=false",
        ],
        "decoder": [
            "data.size=16",
            "data.train_crops=128",
            "data.val_crops=16",
            "batch_size=16",
            "steps=3",
            "decoder.channels=16",
            "decoder.min_channels=8",
            "sample_every=0",
        ],
        "denoiser": [
            "train.data.size=16",
            "train.data.train_crops=64",
            "train.data.val_crops=8",
            "train.batch_size=8",
            "train.steps=3",
            "train.decoder.channels=16",
            "train.decoder.min_channels=8",
            "train.sample_every=0",
        ],
        "eval": {"scales": [1], "num": 8, "denoise_size": 32, "denoise_num": 4, "tune_crops": 2},
    },
}


# ----------------------------------------------------------------------------- training
def _encoder_cfg(kind: str, data: str, seed: int, out: Path, budget: dict[str, Any], extra: list[str]):
    return load_config(
        TrainEncoderConfig,
        ROOT / f"configs/encoder/resnet18_{kind}.yaml",
        [*budget["encoder"], *DATA[data], f"seed={seed}", f"out={out}", *extra],
    )


def _decoder_cfg(kind: str, data: str, seed: int, encoder: Path, out: Path, budget: dict[str, Any], extra: list[str]):
    return load_config(
        TrainDecoderConfig,
        ROOT / f"configs/decoder/resnet18_{kind}_layer3.yaml",
        [*budget["decoder"], *DATA[data], f"seed={seed}", f"encoder.checkpoint={encoder}", f"out={out}", *extra],
    )


def _denoiser_cfg(data: str, seed: int, encoder: Path, out: Path, budget: dict[str, Any], extra: list[str]):
    return load_denoiser_config(
        ROOT / "configs/apps/denoise.yaml",
        [
            *budget["denoiser"],
            *(f"train.{o}" for o in DATA[data]),
            f"train.seed={seed}",
            f"train.encoder.checkpoint={encoder}",
            f"train.out={out}",
            *extra,
        ],
    )


def train_all(data: str, seed: int, root: Path, budget: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train (or reuse) both encoders, their decoders and the robust denoiser for one (data, seed)."""
    runs: dict[str, Any] = {"seconds_this_run": {}}  # about 0 for a reused finished run
    for kind in KINDS:
        start = time.perf_counter()
        enc = train_encoder(_encoder_cfg(kind, data, seed, root / f"encoder_{kind}", budget, args.set), resume=True)
        runs[f"encoder_{kind}"] = enc.path
        runs["val_acc_" + kind] = enc.metrics.get("val_acc")
        runs["seconds_this_run"][f"encoder_{kind}"] = time.perf_counter() - start
        start = time.perf_counter()
        dec = train_decoder(
            _decoder_cfg(kind, data, seed, enc.path, root / f"decoder_{kind}", budget, args.set), resume=True
        )
        runs[f"decoder_{kind}"] = dec.path
        runs["seconds_this_run"][f"decoder_{kind}"] = time.perf_counter() - start
    start = time.perf_counter()
    den = train_denoiser(
        _denoiser_cfg(data, seed, runs["encoder_robust"], root / "denoiser", budget, args.set_denoiser), resume=True
    )
    runs["denoiser"] = den.path
    runs["seconds_this_run"]["denoiser"] = time.perf_counter() - start
    return runs


# ----------------------------------------------------------------------------- evaluation
def eval_inversion(runs: dict[str, Any], train_size: int, ev: dict[str, Any], device: str) -> dict[str, Any]:
    """PSNR per kind, set and scale: ``{kind: {set: {"1x": psnr}}}``."""
    models = {
        k: RobustAutoencoder.from_checkpoints(runs[f"encoder_{k}"], runs[f"decoder_{k}"], device=device) for k in KINDS
    }
    out: dict[str, Any] = {k: {} for k in KINDS}
    for name, folder in SETS.items():
        res = compare_autoencoders(models, ev["scales"], train_size, ev["num"], 0, folder)
        for k in KINDS:
            out[k][name] = {f"{row['scale']}x": row["psnr"] for row in res["models"][k]}
    return out


def denoise_images(ev: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    """The clean evaluation crops per set (held-out regions, unseen images)."""
    return {
        name: list(held_out_images(ev["denoise_size"], ev["denoise_num"], 0, folder)) for name, folder in SETS.items()
    }


def _mean_psnr(outs: list[torch.Tensor], clean: list[torch.Tensor]) -> float:
    return statistics.fmean(float(psnr(o[None], c[None])) for o, c in zip(outs, clean))


def eval_denoiser(path: Path, clean: dict[str, list[torch.Tensor]], sigmas: list[float], device: str) -> dict[str, Any]:
    """PSNR of one denoiser: ``{set: {sigma: psnr}}``."""
    from apps.denoise import load_denoiser

    model, _ = load_denoiser(path, device)
    fn = ours_fn(model)
    with torch.no_grad():
        return {
            name: {f"{s:g}": _mean_psnr([fn(y.to(device)).cpu() for y in noisy_images(c, s, 0)], c) for s in sigmas}
            for name, c in clean.items()
        }


def eval_baselines(
    clean: dict[str, list[torch.Tensor]], sigmas: list[float], tune_crops: int, use_bm3d: bool
) -> dict[str, Any]:
    """Noisy input, NLM (tuned on training-region crops) and BM3D: ``{method: {set: {sigma: psnr}}}``."""
    fn, _ = CLASSICAL[NLM]
    tuned = tune_classical(sigmas, tune_crops, 0, [NLM])[NLM]
    out: dict[str, Any] = {"noisy input": {}, NLM: {}, **({"bm3d": {}} if use_bm3d else {})}
    for name, c in clean.items():
        for by_set in out.values():
            by_set[name] = {}
        for s in sigmas:
            noisy = noisy_images(c, s, 0)
            out["noisy input"][name][f"{s:g}"] = _mean_psnr(noisy, c)
            out[NLM][name][f"{s:g}"] = _mean_psnr([to_tensor(fn(to_numpy(y), s, tuned[str(s)])) for y in noisy], c)
            if use_bm3d:
                out["bm3d"][name][f"{s:g}"] = _mean_psnr([bm3d_fn(s)(y) for y in noisy], c)
    out["nlm_h_factor"] = tuned
    return out


# ----------------------------------------------------------------------------- summaries
def _summary(values: list[float]) -> dict[str, Any]:
    return {"per_seed": values, "median": statistics.median(values)}


def _diff(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b)]


def _collect(per_seed: list[dict[str, Any]], *keys: str) -> list[float]:
    out = []
    for d in per_seed:
        for k in keys:
            d = d[k]
        out.append(float(d))
    return out


def summarize(results: dict[str, Any], seeds: list[int], ev: dict[str, Any], sigmas: list[float]) -> dict[str, Any]:
    """Medians over seeds and paired per-seed differences."""
    inv, den, base = results["inversion"], results["denoise"], results["baselines"]
    scales = [f"{s}x" for s in ev["scales"]]
    s: dict[str, Any] = {
        "inversion": {},
        "robust_minus_standard": {},
        "mixed_minus_photos": {},
        "held_out_minus_unseen": {},
        "denoise": {},
        "denoise_mixed_minus_photos": {},
        "denoise_minus_nlm": {},
    }
    for data in DATA:
        per = [inv[data][str(k)] for k in seeds]
        for kind in KINDS:
            for name in SETS:
                for sc in scales:
                    s["inversion"].setdefault(data, {}).setdefault(kind, {}).setdefault(name, {})[sc] = _summary(
                        _collect(per, kind, name, sc)
                    )
            for sc in scales:
                s["held_out_minus_unseen"].setdefault(data, {}).setdefault(kind, {})[sc] = _summary(
                    _diff(_collect(per, kind, "held-out", sc), _collect(per, kind, "unseen", sc))
                )
        for name in SETS:
            for sc in scales:
                s["robust_minus_standard"].setdefault(data, {}).setdefault(name, {})[sc] = _summary(
                    _diff(_collect(per, "robust", name, sc), _collect(per, "standard", name, sc))
                )
        dper = [den[data][str(k)] for k in seeds]
        for name in SETS:
            for sg in (f"{x:g}" for x in sigmas):
                ours = _collect(dper, name, sg)
                s["denoise"].setdefault(data, {}).setdefault(name, {})[sg] = _summary(ours)
                s["denoise_minus_nlm"].setdefault(data, {}).setdefault(name, {})[sg] = _summary(
                    [v - base[NLM][name][sg] for v in ours]
                )
    for kind in KINDS:
        for name in SETS:
            for sc in scales:
                s["mixed_minus_photos"].setdefault(kind, {}).setdefault(name, {})[sc] = _summary(
                    _diff(
                        _collect([inv["mixed"][str(k)] for k in seeds], kind, name, sc),
                        _collect([inv["photos"][str(k)] for k in seeds], kind, name, sc),
                    )
                )
    for name in SETS:
        for sg in (f"{x:g}" for x in sigmas):
            s["denoise_mixed_minus_photos"].setdefault(name, {})[sg] = _summary(
                _diff(
                    _collect([den["mixed"][str(k)] for k in seeds], name, sg),
                    _collect([den["photos"][str(k)] for k in seeds], name, sg),
                )
            )
    s["goals"] = goals(s, sigmas, scales)
    return s


def goals(s: dict[str, Any], sigmas: list[float], scales: list[str]) -> dict[str, Any]:
    """The issue's three goals, per training set, on the medians."""
    out: dict[str, Any] = {}
    for data in DATA:
        g: dict[str, Any] = {}
        for sg in ("25", "50"):
            if float(sg) in sigmas:
                g[f"denoiser_ahead_of_nlm_unseen_sigma{sg}"] = s["denoise_minus_nlm"][data]["unseen"][sg]["median"] > 0
        rms = s["robust_minus_standard"][data]
        g["robust_gain_unseen_at_least_held_out"] = {
            sc: rms["unseen"][sc]["median"] >= rms["held-out"][sc]["median"] for sc in scales
        }
        g["gap_at_most_2db"] = {
            kind: {sc: abs(v[sc]["median"]) <= 2.0 for sc in scales}
            for kind, v in s["held_out_minus_unseen"][data].items()
        }
        out[data] = g
    return out


def print_tables(rep: dict[str, Any]) -> None:
    s, scales, sigmas = rep["summary"], rep["eval"]["scales"], rep["sigmas"]
    cols = [f"{n} {sc}x" for sc in scales for n in SETS]
    print(f"\nInversion PSNR (dB), median over {len(rep['seeds'])} seed(s); layer3 decoders")
    print(f"{'train data':<10} {'encoder / difference':<24}" + "".join(f"{c:>14}" for c in cols))

    def line(data: str, label: str, table: dict[str, Any]) -> None:  # table: {set: {scale: summary}}
        print(
            f"{data:<10} {label:<24}" + "".join(f"{table[n][f'{sc}x']['median']:>14.2f}" for sc in scales for n in SETS)
        )

    for data in DATA:
        for kind in KINDS:
            line(data, kind, s["inversion"][data][kind])
        line(data, "robust - standard", s["robust_minus_standard"][data])
    for kind in KINDS:
        line("", f"mixed - photos ({kind})", s["mixed_minus_photos"][kind])
    print(
        f"\nDenoising PSNR (dB) on {rep['eval']['denoise_num']} crops of {rep['eval']['denoise_size']} px; "
        f"ours: median over seeds"
    )
    dcols = [f"{n} s{sg:g}" for n in SETS for sg in sigmas]
    print(f"{'method':<28}" + "".join(f"{c:>14}" for c in dcols))
    base = rep["baselines"]
    for method in [m for m in base if m != "nlm_h_factor"]:
        print(f"{method:<28}" + "".join(f"{base[method][n][f'{sg:g}']:>14.2f}" for n in SETS for sg in sigmas))
    for data in DATA:
        print(
            f"{'ours (' + data + ')':<28}"
            + "".join(f"{s['denoise'][data][n][f'{sg:g}']['median']:>14.2f}" for n in SETS for sg in sigmas)
        )
    print(
        f"{'ours: mixed - photos':<28}"
        + "".join(f"{s['denoise_mixed_minus_photos'][n][f'{sg:g}']['median']:>14.2f}" for n in SETS for sg in sigmas)
    )
    print("\nGoals (on medians):")
    for data, g in s["goals"].items():
        print(f"  {data}: {g}")


# ----------------------------------------------------------------------------- estimate
def estimate(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per step of each full-budget job (the difference of a 2-step and a (2+n)-step run), projected."""
    budget, n = BUDGETS["full"], args.estimate_steps
    root = Path(args.workdir) / "estimate"
    shutil.rmtree(root, ignore_errors=True)
    per_step: dict[str, float] = {}

    def timed(key: str, make, train) -> Path:
        walls = []
        for steps in (2, 2 + n):
            cfg = make(root / f"{key}_{steps}", steps)
            start = time.perf_counter()
            path = train(cfg).path
            walls.append(time.perf_counter() - start)
        per_step[key] = (walls[1] - walls[0]) / n
        log.info("%s: %.3f s/step", key, per_step[key])
        return path

    def with_steps(overrides: list[str], key: str, steps: int) -> list[str]:
        return [o for o in overrides if not o.startswith(key)] + [f"{key}={steps}"]

    from encoders.data.synthetic import SyntheticImages

    start = time.perf_counter()
    sets = [
        _encoder_cfg("robust", "mixed", 0, root, budget, args.set).data,
        _denoiser_cfg("mixed", 0, root, root, budget, args.set_denoiser).train.data,
    ]
    for d in sets:  # the synthetic part of the encoders' and decoders' set, then of the denoisers'
        SyntheticImages("train", d.size, round(d.train_crops * d.synthetic_ratio), d.seed)
    synth_s = time.perf_counter() - start
    encs = {}
    for kind in KINDS:
        encs[kind] = timed(
            f"encoder_{kind}",
            lambda out, st, k=kind: _encoder_cfg(
                k, "mixed", 0, out, {**budget, "encoder": with_steps(budget["encoder"], "steps", st)}, args.set
            ),
            lambda c: train_encoder(c),
        )
        timed(
            f"decoder_{kind}",
            lambda out, st, k=kind: _decoder_cfg(
                k, "mixed", 0, encs[k], out, {**budget, "decoder": with_steps(budget["decoder"], "steps", st)}, args.set
            ),
            lambda c: train_decoder(c),
        )
    timed(
        "denoiser",
        lambda out, st: _denoiser_cfg(
            "mixed",
            0,
            encs["robust"],
            out,
            {**budget, "denoiser": with_steps(budget["denoiser"], "train.steps", st)},
            args.set_denoiser,
        ),
        lambda c: train_denoiser(c),
    )
    steps = {f"encoder_{k}": _steps(budget["encoder"], "steps") for k in KINDS}
    steps.update({f"decoder_{k}": _steps(budget["decoder"], "steps") for k in KINDS})
    steps["denoiser"] = _steps(budget["denoiser"], "train.steps")
    train_s = sum(per_step[k] * steps[k] for k in steps) * len(DATA) * args.seeds
    total = train_s + synth_s
    rep = {
        "seconds_per_step": per_step,
        "steps": steps,
        "synthetic_generation_s": synth_s,
        "projected_training_s": train_s,
        "projected_total_s_without_eval": total,
        "load_avg": os.getloadavg(),
        "threads": torch.get_num_threads(),
    }
    print(f"\nseconds per step: {', '.join(f'{k} {v:.3f}' for k, v in per_step.items())}")
    print(
        f"synthetic images ({' + '.join(f'{round(d.train_crops * d.synthetic_ratio)} at {d.size} px' for d in sets)}): "
        f"{synth_s:.0f} s"
    )
    print(
        f"projected full run ({args.seeds} seeds x {len(DATA)} training sets): training {train_s / 60:.1f} min "
        f"+ generation {synth_s / 60:.1f} min, plus evaluation (load average now {os.getloadavg()[0]:.1f})"
    )
    shutil.rmtree(root, ignore_errors=True)
    return rep


def _steps(overrides: list[str], key: str) -> int:
    return next(int(o.split("=", 1)[1]) for o in overrides if o.startswith(key + "="))


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny models, a few steps, 2 seeds")
    p.add_argument("--estimate", action="store_true", help="time the full-budget jobs for a few steps and project")
    p.add_argument("--estimate-steps", type=int, default=10, help="extra steps timed per job (default 10)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds (default 3; --tiny: 2)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[15, 25, 50])
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="key=value",
        help="more overrides of the encoder and decoder configs (both)",
    )
    p.add_argument("--set-denoiser", nargs="*", default=[], metavar="key=value", help="more train-denoiser overrides")
    p.add_argument(
        "--train-only",
        choices=DATA,
        help="train (or resume) this training set's runs for every seed and "
        "stop: two such processes fill two cores; a plain call evaluates",
    )
    p.add_argument("--no-bm3d", action="store_true", help="skip BM3D")
    p.add_argument("--workdir", default="runs/bench/generalization")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--out",
        default=None,
        help="JSON (default bench/results/generalization.json; --tiny: in the "
        "workdir; --estimate: bench/results/generalization_estimate.json)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    os.environ.setdefault("RFI_NO_PROGRESS", "1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.seeds = args.seeds or (2 if args.tiny else 3)
    if args.estimate:
        rep = estimate(args)
        write_json(rep, args.out or ROOT / "bench/results/generalization_estimate.json")
        return rep
    name = "tiny" if args.tiny else "full"
    budget, ev = BUDGETS[name], BUDGETS[name]["eval"]
    overrides = [*budget["encoder"], *budget["decoder"], *budget["denoiser"], *args.set, *args.set_denoiser]
    workdir = Path(args.workdir) / f"{name}_{hashlib.sha1(' '.join(overrides).encode()).hexdigest()[:8]}"
    seeds = list(range(args.seeds))
    t0, load_before = time.perf_counter(), os.getloadavg()
    use_bm3d = not args.no_bm3d and bm3d_fn(25) is not None
    if not args.no_bm3d and not use_bm3d:
        print(BM3D_MISSING, file=sys.stderr)
    clean = denoise_images(ev)
    results: dict[str, Any] = {"inversion": {}, "denoise": {}, "runs": {}}
    train_size = _encoder_cfg("standard", "photos", 0, workdir, budget, args.set).data.size
    if args.train_only:
        for seed in seeds:
            train_all(args.train_only, seed, workdir / args.train_only / f"seed{seed}", budget, args)
        return {}
    for seed in seeds:  # whole seeds one after the other: a killed run keeps finished seeds' folders
        for data in DATA:
            runs = train_all(data, seed, workdir / data / f"seed{seed}", budget, args)
            results["runs"].setdefault(data, {})[str(seed)] = {
                k: str(v) if isinstance(v, Path) else v for k, v in runs.items()
            }
            results["inversion"].setdefault(data, {})[str(seed)] = eval_inversion(runs, train_size, ev, args.device)
            results["denoise"].setdefault(data, {})[str(seed)] = eval_denoiser(
                runs["denoiser"], clean, args.sigmas, args.device
            )
            log.info("%s seed %d done (%.0f s so far)", data, seed, time.perf_counter() - t0)
    results["baselines"] = eval_baselines(clean, args.sigmas, ev["tune_crops"], use_bm3d)
    rep = {
        "command": "python bench/generalization.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "budget": name,
        "overrides": {k: budget[k] for k in ("encoder", "decoder", "denoiser")},
        "eval": ev,
        "sigmas": args.sigmas,
        "seeds": seeds,
        "workdir": str(workdir),
        **results,
        "summary": summarize(results, seeds, ev, args.sigmas),
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_avg_before": load_before,
            "load_avg_now": os.getloadavg(),
            "seconds": time.perf_counter() - t0,
        },
    }
    out = args.out or (
        workdir / "generalization_tiny.json" if args.tiny else ROOT / "bench/results/generalization.json"
    )
    write_json(rep, out)
    print_tables(rep)
    print(f"\nwrote {out} ({rep['env']['seconds']:.0f} s)")
    return rep


if __name__ == "__main__":
    main()
