"""Encoders: a registered architecture with normalisation inside and named feature taps.

An :class:`Encoder` takes images in [0, 1] and normalises them itself (as the
``robustness`` library's models do), so every caller passes plain images. Calling it
returns an ordered dict of feature maps at named layers (built on
``torchvision.models.feature_extraction``, or the family's own runner); :meth:`Encoder.logits`
gives class scores (for training and attacks). The network itself comes from its
family in :mod:`encoders.nets.registry`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

from encoders.core.errors import RFIError
from encoders.core.imageio import check_images
from encoders.nets.downsample import (
    DOWNSAMPLING,
    Downsampling,
    PhasedFeatures,
    convert_downsampling,
    encoder_phases,
    leaf_modules,
    phase_path,
)
from encoders.nets.registry import EncoderFamily, architectures_with, encoder_family, family_options

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputNormalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the same buffer names as the ``robustness`` library.

    Shape: (B, 3, H, W) -> (B, 3, H, W); input in [0, 1].
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("new_mean", torch.tensor(mean).view(3, 1, 1))
        self.register_buffer("new_std", torch.tensor(std).view(3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.new_mean) / self.new_std


INPUT_TAP = "input"
"""A pseudo-layer every encoder accepts: the input image itself, in [0, 1] (3 channels, stride 1).

It is not in :attr:`Encoder.layer_names` (so "all layers" stays the network's layers); a
decoder takes it as an image-level skip link (e.g. the denoiser: ``decoder.skips: [input]``).
"""


class Encoder(nn.Module):
    """A registered classifier network with input normalisation and named feature taps.

    Args:
        arch: a registered architecture (:func:`~encoders.nets.registry.list_encoders`: ``alexnet,
            vgg16, vgg19, resnet18, resnet50, swin_t, swin_v2_t``).
        num_classes: size of the classification head.
        width: channel multiplier (0.25 gives a CPU-sized ResNet-18 with widths 16-128).
        small_input: 3x3 stride-1 stem without the stem max-pool (for 32-64 px images).
        layers: the layers :meth:`forward` returns (default: all of :attr:`layer_names`), and
            optionally :data:`INPUT_TAP` (the input image itself).
        downsample: ``stride`` (the architecture as is), ``blurpool`` (anti-aliased) or
            ``lps`` (learnable polyphase sampling, exactly shift-invariant in eval mode; its
            forward returns :class:`~encoders.nets.downsample.PhasedFeatures`); CNN families
            only. See :mod:`encoders.nets.downsample`.
        **options: the family's options (another family's option at its default is ignored):
            VGG ``batch_norm`` (the ``vgg*_bn`` variant); Swin ``equivariant`` (the truly
            shift-equivariant form, :mod:`encoders.nets.equivariant_vit`; its forward returns
            :class:`~encoders.nets.downsample.PhasedFeatures`), ``selection`` (``norm`` or
            ``learned``), ``embed_dim``, ``depths``, ``num_heads``, ``window_size``, ``patch_size``,
            ``stochastic_depth`` (default: torchvision's; ``width`` scales ``embed_dim``; stages
            are tapped as ``stage1`` ... ``stage<len(depths)>``, (B, C, H, W) maps).

    Raises:
        RFIError: an unknown architecture, layer or option, or an option this architecture does not take.

    Shape:
        - Input: (B, 3, H, W), values in [0, 1]; a float batch of another precision than the
          weights (``float64``) is converted to theirs, an integer batch is refused.
        - Output: ordered dict ``{layer: (B, C_l, H_l, W_l)}``.

    Example:
        >>> enc = Encoder("resnet18", num_classes=8, width=0.25, small_input=True, layers=["layer3"])
        >>> {k: tuple(v.shape) for k, v in enc(torch.rand(2, 3, 32, 32)).items()}
        {'layer3': (2, 64, 8, 8)}
    """

    def __init__(
        self,
        arch: str,
        num_classes: int = 1000,
        width: float = 1.0,
        small_input: bool = False,
        layers: Sequence[str] | None = None,
        downsample: Downsampling = "stride",
        **options: Any,
    ):
        super().__init__()
        family = encoder_family(arch)
        if width <= 0:
            raise RFIError(f"width must be positive, got {width}")
        options = family_options(arch, options)
        if downsample not in DOWNSAMPLING:
            raise RFIError(f"unknown downsample '{downsample}' (valid: {', '.join(DOWNSAMPLING)})")
        if downsample != "stride" and family.downsample_layers is None:
            hint = " (use equivariant=True)" if "equivariant" in family.options else ""
            raise RFIError(
                f"downsample='{downsample}': only for {' / '.join(architectures_with('downsample'))}, not {arch}{hint}"
            )
        built = family.build(arch, num_classes, width, small_input, **options)
        if downsample != "stride":
            convert_downsampling(built.model, downsample, partial(family.downsample_layers, small_input=small_input))
        self.arch, self.num_classes, self.width, self.small_input = arch, num_classes, width, small_input
        self.downsample = downsample
        self.options = built.options
        self.normalizer = InputNormalize()
        self.model = built.model
        self.taps = built.taps
        self._extractors: dict[tuple[str, ...], nn.Module] = {}
        self.layers = self.check_layers(layers) if layers is not None else list(self.taps)

    @property
    def family(self) -> EncoderFamily:
        """The registry entry that built this architecture."""
        return encoder_family(self.arch)

    @property
    def equivariant(self) -> bool:
        """Whether this is the truly shift-equivariant form of a transformer (``equivariant=True``)."""
        return bool(self.options.get("equivariant", False))

    @property
    def layer_names(self) -> list[str]:
        """All layers this architecture can tap, shallow to deep."""
        return list(self.taps)

    def check_layers(self, layers: Sequence[str]) -> list[str]:
        """Validate layer names, returned in shallow-to-deep order (:data:`INPUT_TAP` first)."""
        if isinstance(layers, str):
            layers = [layers]
        bad = [name for name in layers if name not in self.taps and name != INPUT_TAP]
        if bad or not layers:
            raise RFIError(
                f"unknown layer {', '.join(map(repr, bad)) or '(none given)'} for {self.arch} "
                f"(valid: {', '.join(self.taps)}, {INPUT_TAP})"
            )
        return [INPUT_TAP] * (INPUT_TAP in layers) + [name for name in self.taps if name in layers]

    def config(self) -> dict[str, Any]:
        """The constructor arguments (without ``layers``), as stored in checkpoints."""
        cfg = {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "width": self.width,
            "small_input": self.small_input,
            **self.options,
        }
        if self.downsample != "stride":  # only then, so default configs stay as they were
            cfg["downsample"] = self.downsample
        return cfg

    def size_multiple(self, layer: str | None = None) -> int:
        """Image height and width must be multiples of this (1: any size; equivariant Swin: total stride x window)."""
        return self.family.size_multiple(self.options) if self.equivariant else 1

    def phase_names(self, layer: str) -> list[str] | None:
        """Names of the phase choices before ``layer`` (shallow to deep) that the forward's
        ``phases`` carry (LPS and equivariant transformers; one per stride-2 step), else ``None``."""
        if self.equivariant:
            return self.family.phase_names(self.model, self.taps[layer])
        if self.downsample == "lps":
            return phase_path(self.model, self.taps[layer])
        return None

    def _extractor(self, layers: tuple[str, ...]) -> nn.Module:
        if layers not in self._extractors:
            # The extractor shares parameters and buffers with ``self.model``; it is kept out
            # of the module tree so the state dict holds each tensor once.
            kwargs = {}
            if self.downsample != "stride":  # LPD/BlurPool run as opaque leaves (LPD records its phase)
                kwargs["tracer_kwargs"] = {"leaf_modules": leaf_modules(self.downsample)}
            self._extractors[layers] = create_feature_extractor(
                self.model, return_nodes={self.taps[name]: name for name in layers}, **kwargs
            )
        extractor = self._extractors[layers]
        extractor.train(self.training)
        return extractor

    def reset_extractors(self) -> None:
        """Forget cached feature extractors (call after replacing submodules of ``model``)."""
        self._extractors.clear()

    def forward(self, x: Tensor, layers: Sequence[str] | None = None) -> OrderedDict[str, Tensor]:
        # one line for NaN, 0-255 values, (3, H, W), grey or RGBA batches; float64 etc. to the weights' dtype
        x = check_images(x, "encoder input", dtype=self._dtype)
        names = tuple(self.check_layers(layers)) if layers is not None else tuple(self.layers)
        deep = tuple(name for name in names if name != INPUT_TAP)
        feats = OrderedDict([(INPUT_TAP, x)] * (INPUT_TAP in names))
        if not deep:
            return feats
        self._check_size(x)
        if self.family.features is not None:
            feats.update(self.family.features(self.model, self.normalizer(x), self.taps, deep))
        else:
            feats.update(self._extractor(deep)(self.normalizer(x)))
        if self.equivariant:  # the phases travel with the features (for LPU decoders)
            return PhasedFeatures(feats, self.family.phases(self.model, self.taps[deep[-1]]))
        if self.downsample == "lps":
            return PhasedFeatures(feats, encoder_phases(self.model, self.taps[deep[-1]]))
        return feats

    def logits(self, x: Tensor) -> Tensor:
        """Class scores for images in [0, 1] (any float dtype, computed in the weights').

        Shape: (B, 3, H, W) -> (B, num_classes).
        """
        self._check_size(x)
        return self.model(self.normalizer(x.to(self._dtype) if x.is_floating_point() else x))

    @property
    def _dtype(self) -> torch.dtype:
        """The weights' dtype, which inputs of another float dtype (``float64``) are converted to."""
        return next(self.parameters()).dtype

    def _check_size(self, x: Tensor) -> None:
        if self.equivariant:
            self.family.check_image_size(x.shape[-2], x.shape[-1], self.arch, self.options)

    @torch.no_grad()
    def feature_info(self, size: int | None = None) -> OrderedDict[str, tuple[int, int]]:
        """``{layer: (channels, stride)}`` measured with one probe forward pass at ``size`` px.

        ``size`` is rounded up to :meth:`size_multiple`. The default probe is 64 px
        (``small_input``) or 224 px, at most the largest image the network takes
        (:meth:`~encoders.nets.registry.EncoderFamily.max_image_size`; MViTv2's ``img_size``).
        """
        m, largest = self.size_multiple(), self.family.max_image_size(self.options)
        default = size is None
        size = -(-(size or min(64 if self.small_input else 224, largest or 224)) // m) * m
        if default and largest is not None and size > largest >= m:
            size = largest // m * m
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        feats = self(
            torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype), layers=[INPUT_TAP, *self.layer_names]
        )
        self.train(was_training)
        return OrderedDict((k, (v.shape[1], size // v.shape[-1])) for k, v in feats.items())

    @torch.no_grad()
    def check_input_size(self, size: int, key: str = "data.size") -> None:
        """Refuse a square input side the network cannot take, naming ``key`` (one probe forward pass).

        Raises:
            RFIError: too small for the network's down-sampling (or not the multiple it needs).
        """
        if size < 1:
            raise RFIError(f"{key} must be >= 1 pixel, got {size}")
        multiple = self.size_multiple()
        if size % multiple:
            raise RFIError(f"{key}={size} is not a multiple of {multiple}, which this {self.arch} needs")
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        try:
            self(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype), layers=self.layer_names)
        except RuntimeError as e:
            raise RFIError(f"{key}={size} px is too small for this {self.arch} ({str(e).splitlines()[0]})") from None
        finally:
            self.train(was_training)

    def __getstate__(self):  # cached FX modules are rebuilt on demand, never pickled/deep-copied
        state = self.__dict__.copy()
        state["_extractors"] = {}
        return state
