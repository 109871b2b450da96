"""The image tools built on robust autoencoders (denoise, anomaly detection, style transfer,
style augmentation). Public classes are imported on first use, so ``import apps`` (and every
``rfi`` command) stays light.
"""

from importlib import import_module

_LAZY = {"StyleAugment": "apps.style.augment", "MultiView": "apps.style.multiview"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'apps' has no attribute {name!r}")
