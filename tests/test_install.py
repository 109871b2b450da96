"""A non-editable install finds its configs from any folder: build the wheel, install it in a fresh venv, run `rfi`.

The venv sees the site-packages of the environment that runs the test (torch and the other
dependencies come from there, whether that is the system Python, a virtualenv or conda), but
`rfi` must import the installed copy of `apps`/`encoders`/`configs`, never this checkout, and
the commands must read `configs/...` from the installed package data while the working
directory is an empty temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import torch

from encoders.core.imageio import write_image

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "encoders", "inversion", "apps", "configs")

# In CI (62 s on 2 cores shared with two training runs): the non-editable install is issue 10's point 5.


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _see_running_environment(python: Path, env: dict[str, str]) -> None:
    """Put this interpreter's site-packages (and pip) on the new venv's path, after its own.

    ``venv --system-site-packages`` would link the *base* interpreter's site, which inside a
    virtualenv or conda environment has no torch. A ``.pth`` file lists the running
    environment's directories instead; ``.pth`` files inside them are not processed, so this
    checkout's editable-install hook stays out and the venv's own copy is imported first.
    """
    paths = [*site.getsitepackages(), site.getusersitepackages()]
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], python.parent, env
    ).stdout.strip()
    Path(purelib, "_running_environment.pth").write_text("\n".join(p for p in paths if Path(p).is_dir()) + "\n")


def test_wheel_in_a_fresh_venv_finds_its_configs_from_another_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(src),
        ],
        tmp_path,
        env,
    )
    wheel = next((tmp_path / "wheel").glob("robust_inversion-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python, rfi = venv / "bin" / "python", venv / "bin" / "rfi"
    _see_running_environment(python, env)
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        tmp_path,
        env,
    )

    work = tmp_path / "elsewhere"  # no configs/ here: every configs/... path must come from the installed package
    work.mkdir()
    where = _run(
        [
            str(python),
            "-c",
            "import apps, configs, encoders, inversion; "
            "print('\\n'.join(m.__file__ for m in (apps, configs, encoders, inversion)))",
        ],
        work,
        env,
    )
    site = venv.resolve()
    for path in where.stdout.split():
        assert Path(path).resolve().is_relative_to(site), f"{path} is not the installed copy"
        assert not Path(path).resolve().is_relative_to(ROOT)

    # configs/quickstart.yaml and the encoder/decoder files it names, read from the package data
    _run([str(rfi), "quickstart", "--budget", "tiny", "--out", "q", "device=cpu"], work, env)
    report = json.loads((work / "q" / "report.json").read_text())
    shipped = Path(report["config"]).resolve()  # the installed copy, inside the venv
    assert shipped.name == "quickstart.yaml" and shipped.is_relative_to(site), shipped
    assert report["budget"] == "tiny" and set(report["runs"]) == {"standard", "robust"}
    assert set(report["shipped"]) == {"shipped robust", "shipped standard"}  # the wheel holds RFI's shipped models

    # an app YAML by its documented path (configs/apps/augment.yaml), with the robust run just trained
    images = work / "images"
    images.mkdir()
    for i in range(2):
        write_image(torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(i)), images / f"img{i}.png")
    robust = report["runs"]["robust"]
    _run(
        [
            str(rfi),
            "augment",
            "images",
            "--out",
            "views",
            "--config",
            "configs/apps/augment.yaml",
            "--views",
            "1",
            "--size",
            "16",
            "--encoder",
            robust["encoder"]["path"],
            "--decoder",
            robust["decoder"]["path"],
        ],
        work,
        env,
    )
    assert sorted(p.name for p in (work / "views").glob("*_view1.png")) == ["img0_view1.png", "img1_view1.png"]
    # the first command of the README's shipped tools: no model given, the wheel's shipped pair inverts
    _run([str(rfi), "invert", "images/img0.png", "--out", "inverted"], work, env)
    assert (work / "inverted" / "img0.png").is_file()
    missing = subprocess.run(
        [str(rfi), "augment", "images", "--out", "v2", "--config", "configs/apps/nope.yaml"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "config file not found: configs/apps/nope.yaml" in missing.stderr
