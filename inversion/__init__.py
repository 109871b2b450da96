"""Feature inversion: decoders, the encoder-decoder core, the optimisation baseline, metrics, evaluation.

The apps use :class:`RobustAutoencoder` (``encode``, ``decode``, ``reconstruct``) and nothing
else for encoder/decoder plumbing. Metrics, LPIPS, the optimisation baseline and evaluation
are imported on first use (they pull in kornia).
"""

from importlib import import_module

from encoders.core.imageio import check_images
from inversion.autoencoder import RobustAutoencoder
from inversion.decoders import Decoder, decoder_from_checkpoint, load_decoder, save_decoder

_LAZY = {
    "psnr": "inversion.metrics",
    "ssim": "inversion.metrics",
    "lpips_distance": "inversion.metrics",
    "load_lpips": "inversion.perceptual",
    "lpips_status": "inversion.perceptual",
    "invert_by_optimization": "inversion.optimize",
    "evaluate_autoencoder": "inversion.evaluate",
    "compare_autoencoders": "inversion.evaluate",
}

__all__ = [
    "Decoder",
    "RobustAutoencoder",
    "check_images",
    "decoder_from_checkpoint",
    "load_decoder",
    "save_decoder",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'inversion' has no attribute {name!r}")
