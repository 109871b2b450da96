"""Anomaly detection with robust autoencoders and memory banks (``rfi anomaly fit|score|make-benchmark``).

One job per module: :mod:`~apps.anomaly.config` (the settings), :mod:`~apps.anomaly.data`
(finding images, labels and masks), :mod:`~apps.anomaly.benchmark` (benchmarks with synthetic
defects: the embedded textures or a folder of photos), :mod:`~apps.anomaly.baseline` (the
raw-pixel patch baseline),
:mod:`~apps.anomaly.decoded` (normal images decoded once), :mod:`~apps.anomaly.maps` (error
maps, smoothing, image scores, heat maps), :mod:`~apps.anomaly.memory` (the PatchCore-style
memory bank), :mod:`~apps.anomaly.detector` (:class:`AnomalyDetector`),
:mod:`~apps.anomaly.metrics` (AUROC, F1), :mod:`~apps.anomaly.fitting` (:func:`fit`) and
:mod:`~apps.anomaly.scoring` (:func:`score`). The names below are imported on first use.
"""

from importlib import import_module

_LAZY = {
    "AnomalyConfig": "apps.anomaly.config",
    "load_anomaly_config": "apps.anomaly.config",
    "AnomalyDetector": "apps.anomaly.detector",
    "fit": "apps.anomaly.fitting",
    "score": "apps.anomaly.scoring",
    "load_anomaly_data": "apps.anomaly.data",
    "make_benchmark": "apps.anomaly.benchmark",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'apps.anomaly' has no attribute {name!r}")
