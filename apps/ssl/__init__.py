"""Self-supervised learning (SimCLR, MoCo v2) with optional style augmentation (SASSL): ``rfi ssl``.

One module per job: :mod:`apps.ssl.config` (the YAML config), :mod:`apps.ssl.views` (the
contrastive views and where StyleAugment sits in them), :mod:`apps.ssl.methods` (SimCLR,
MoCo v2, their losses), :mod:`apps.ssl.train` (:class:`SSLTrainer` on the training scaffold, :func:`run_ssl`)
and :mod:`apps.ssl.probes` (linear probes on downstream tasks). The main entry points are
importable from here.

Example:
    >>> from apps.ssl import SSLConfig, run_ssl
    >>> from encoders.core.config import load_config
    >>> cfg = load_config(SSLConfig, "configs/apps/ssl.yaml", ["method=mocov2", "steps=2"])
    >>> result = run_ssl(cfg)  # doctest: +SKIP
"""

from apps.ssl.config import SSLConfig
from apps.ssl.methods import MoCo, SimCLR
from apps.ssl.probes import linear_probe
from apps.ssl.train import run_ssl

__all__ = ["MoCo", "SSLConfig", "SimCLR", "linear_probe", "run_ssl"]
