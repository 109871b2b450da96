"""Shift-robust down-sampling: anti-aliased blur pooling and learnable polyphase sampling (LPS).

``Encoder(..., downsample=...)`` rebuilds every strided convolution and pooling layer of a
CNN as the stride-1 layer followed by a down-sampling layer (each family says where its
strided layers are, in its ``downsample_layers`` hook; :class:`Downsampler` does the rest):

- ``stride`` (default): the architecture unchanged.
- ``blurpool``: low-pass filter, then subsample (Zhang, ICML 2019), with
  :class:`kornia.filters.BlurPool2D` (3x3 binomial kernel). Less aliasing, not exact.
- ``lps``: learnable polyphase down-sampling, :class:`LPD` (Rojas-Gomez, Lim et al.,
  NeurIPS 2022). The input is split into its ``stride**2`` polyphase components; a small
  shared network scores each one and one component is kept: a Gumbel-softmax mixture
  during training, the argmax at evaluation. Every convolution of the model uses circular
  padding, so an LPS encoder in eval mode is *exactly* invariant (logits) and equivariant
  (feature maps, up to the shift the chosen phases imply) to circular shifts of its input.

ResNet shortcuts (the rule is in :mod:`encoders.nets.resnet`): a down-sampling block has two
branches, and both must keep the *same* phase or the residual sum mixes misaligned maps. The
main branch's :class:`LPD` chooses (it sees the block's conv output), and the shortcut's
:class:`SamePhase` reuses that choice on the block input (1x1 convolution and BatchNorm are
point-wise, so selecting before the 1x1 convolution is the same as after, at a quarter of the cost).

Phases travel to decoders with the features: an LPS encoder returns
:class:`PhasedFeatures` (an ordered dict of feature maps with a ``phases`` attribute
``{lpd name: (B, stride**2) selection weights}``), which ``inversion.upsample.LPU`` reads.

Example:
    >>> from encoders import create_encoder
    >>> enc = create_encoder("resnet18", width=0.125, small_input=True, num_classes=8, downsample="lps").eval()
    >>> x = torch.rand(2, 3, 32, 32)
    >>> torch.equal(enc.logits(x).argmax(1), enc.logits(x.roll((5, -3), (2, 3))).argmax(1))
    True
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.core.errors import RFIError

Downsampling = Literal["stride", "blurpool", "lps"]
DOWNSAMPLING: tuple[Downsampling, ...] = ("stride", "blurpool", "lps")
BLUR_KERNEL = 3
TAU_START, TAU_END = 1.0, 0.1  # Gumbel-softmax temperature at the start / end of training


def polyphase(x: Tensor, stride: int) -> Tensor:
    """The ``stride**2`` polyphase components of ``x``; component ``i * stride + j`` is ``x[..., i::s, j::s]``.

    Shape: (B, C, H, W) -> (B, stride**2, C, H / stride, W / stride).
    """
    b, c, h, w = x.shape
    return F.pixel_unshuffle(x, stride).view(b, c, stride * stride, h // stride, w // stride).transpose(1, 2)


def hard_choice(weights: Tensor) -> Tensor | None:
    """The chosen indices (B,) if ``weights`` (B, P) are constant one-hot rows, else ``None``."""
    if weights.requires_grad or not bool(((weights == 0) | (weights == 1)).all() and (weights.sum(1) == 1).all()):
        return None
    return weights.argmax(1)


def select_phase(components: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of polyphase components: a mixture (training) or exactly one (one-hot weights).

    With constant one-hot weights (eval mode) the chosen component is gathered, bit-exactly.

    Shape: components (B, P, C, h, w), weights (B, P) -> (B, C, h, w).
    """
    index = hard_choice(weights)
    if index is not None:
        return components[torch.arange(components.shape[0], device=components.device), index]
    return (components * weights[:, :, None, None, None].to(components.dtype)).sum(1)


def check_divisible(x: Tensor, stride: int, name: str, totals: tuple[int, int] | None = None) -> None:
    """Refuse feature maps whose size is not a multiple of ``stride`` (polyphase splits need it).

    ``totals``: the model's down-sampling factor up to this layer and in all, to say which image sizes work.
    """
    h, w = x.shape[-2:]
    if h % stride or w % stride:
        hint = f"{totals[1]} ({totals[0]} up to this layer)" if totals else "the encoder's total stride"
        raise RFIError(
            f"polyphase down-sampling at '{name or 'LPD'}' needs a height and width divisible by "
            f"{stride}, got {h}x{w} there: use images whose height and width are multiples of "
            f"{hint}; padding would break the exact shift invariance"
        )


class CircularConv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` with circular padding, padded by concatenation.

    Same result and state dict as ``nn.Conv2d(..., padding_mode="circular")``; hand-written
    because ``F.pad``'s circular mode copies slice by slice and, on CPU, makes a 3x3
    convolution's forward + backward about twice as slow as concatenation does.
    """

    def __init__(self, *args, **kwargs):
        kwargs["padding_mode"] = "circular"
        super().__init__(*args, **kwargs)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ph, pw = self.padding
        if ph:
            input = torch.cat([input[..., -ph:, :], input, input[..., :ph, :]], dim=-2)
        if pw:
            input = torch.cat([input[..., -pw:], input, input[..., :pw]], dim=-1)
        return F.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> CircularConv2d:
        """A circular copy of ``conv`` (same weights)."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
        )
        new.load_state_dict(conv.state_dict())
        return new.to(conv.weight.device, conv.weight.dtype)


def circular_convs(model: nn.Module, all_padded: bool = False) -> nn.Module:
    """Replace (in place) the ``nn.Conv2d`` layers that pad circularly (or, with ``all_padded``,
    every padded one) by :class:`CircularConv2d` with the same weights; returns ``model``."""
    names = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Conv2d and any(p > 0 for p in m.padding) and (all_padded or m.padding_mode == "circular")
    ]
    for name in names:
        parent, _, child = name.rpartition(".")
        module = model.get_submodule(parent)
        setattr(module, child, CircularConv2d.from_conv(getattr(module, child)))
    return model


class LPD(nn.Module):
    """Learnable polyphase down-sampling: keep the highest-scoring polyphase component.

    The scoring network (conv3x3 - ReLU - conv3x3 to one channel, circular padding, then a
    global mean) is shared by the components, so the scores permute with the components
    when the input is circularly shifted and the same content is kept. Training mode
    mixes the components with Gumbel-softmax weights at temperature :attr:`tau` (the
    scorer gets gradients); eval mode keeps the argmax exactly. The weights of the last
    forward are kept in :attr:`weights` for the shortcut (:class:`SamePhase`) and for
    decoders (``inversion.upsample.LPU``).

    Args:
        channels: input channels.
        stride: down-sampling factor (the input's height and width must be multiples).
        hidden: channels of the scoring network (default ``max(8, channels // 4)``).
        name: the layer's name in the model, for error messages.

    Shape:
        - Input: (B, C, H, W), H and W divisible by ``stride``.
        - Output: (B, C, H / stride, W / stride).

    Example:
        >>> lpd = LPD(4).eval()
        >>> x = torch.rand(1, 4, 8, 8)
        >>> y, y_shift = lpd(x), lpd(x.roll(1, dims=3))
        >>> any(torch.equal(y_shift, y.roll(k, dims=3)) for k in range(4))
        True
    """

    def __init__(self, channels: int, stride: int = 2, hidden: int | None = None, name: str = ""):
        super().__init__()
        hidden = hidden or max(8, channels // 4)
        self.stride, self.name, self.tau = stride, name, TAU_START
        self.totals = (stride, stride)  # model's down-sampling up to here, and in all (set by the conversion)
        # The last conv has one output channel: a mean over C output channels of a linear
        # layer equals one linear output, so this is the paper's conv-ReLU-conv-mean, cheaper.
        self.score = nn.Sequential(
            CircularConv2d(channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            CircularConv2d(hidden, 1, 3, padding=1),
        )
        self.weights: Tensor | None = None

    def logits(self, components: Tensor) -> Tensor:
        """Scores of the components. Shape: (B, P, C, h, w) -> (B, P)."""
        b, p = components.shape[:2]
        return self.score(components.flatten(0, 1)).mean(dim=(1, 2, 3)).view(b, p)

    def forward(self, x: Tensor) -> Tensor:
        check_divisible(x, self.stride, self.name, self.totals)
        components = polyphase(x, self.stride)
        logits = self.logits(components)
        if self.training:
            weights = F.gumbel_softmax(logits, tau=self.tau, dim=1)
        else:
            weights = F.one_hot(logits.argmax(1), logits.shape[1]).to(x.dtype)
        self.weights = weights
        return select_phase(components, weights)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, tau={self.tau:g}"

    def __getstate__(self):  # the last selection is transient (and may carry autograd history)
        state = self.__dict__.copy()
        state["weights"] = None
        return state


class SamePhase(nn.Module):
    """Subsample with the phase that another :class:`LPD` chose in the same forward pass.

    Used on ResNet shortcuts, so that the shortcut and the residual branch stay aligned.
    The source is held by reference, not as a sub-module (its weights are saved once).

    Shape: (B, C, H, W) -> (B, C, H / stride, W / stride).
    """

    def __init__(self, source: LPD):
        super().__init__()
        self._source = (source,)
        self.stride = source.stride

    @property
    def source(self) -> LPD:
        return self._source[0]

    def forward(self, x: Tensor) -> Tensor:
        weights = self.source.weights
        check_divisible(x, self.stride, self.source.name + " (shortcut)", self.source.totals)
        if weights is None or weights.shape[0] != x.shape[0]:
            raise RFIError(f"shortcut of '{self.source.name}' ran before its residual branch chose a phase")
        return select_phase(polyphase(x, self.stride), weights)

    def extra_repr(self) -> str:
        return f"source={self.source.name!r}"


class PhasedFeatures(OrderedDict):
    """Feature maps ``{layer: tensor}`` plus the phases the encoder's LPD layers chose.

    Behaves as the plain ordered dict an encoder returns; ``phases`` is
    ``{lpd name: (B, stride**2) weights}``, shallow to deep (one-hot in eval mode).
    """

    def __init__(self, features: Iterable | Mapping = (), phases: Mapping[str, Tensor] | None = None):
        super().__init__(features)
        self.phases: OrderedDict[str, Tensor] = OrderedDict(phases or {})


def lpd_modules(model: nn.Module) -> OrderedDict[str, LPD]:
    """The model's :class:`LPD` layers by name, in execution (= definition) order."""
    return OrderedDict((name, m) for name, m in model.named_modules() if isinstance(m, LPD))


def phase_path(model: nn.Module, node: str) -> list[str]:
    """Names of the LPD layers that run before the output of module ``node`` (shallow to deep).

    Works for the architectures here, whose module definition order is their execution order.
    """
    path, inside = [], False
    for name, m in model.named_modules():
        if name == node or name.startswith(node + "."):
            inside = True
        elif inside:
            break
        if isinstance(m, LPD):
            path.append(name)
    if not inside:
        raise RFIError(f"no module '{node}' in the model")
    return path


def set_temperature(model: nn.Module, tau: float) -> None:
    """Set the Gumbel-softmax temperature of every :class:`LPD` in ``model``."""
    for m in model.modules():
        if isinstance(m, LPD):
            m.tau = float(tau)


def annealed_temperature(fraction: float, start: float = TAU_START, end: float = TAU_END) -> float:
    """Geometric annealing from ``start`` (fraction 0 of training) to ``end`` (fraction 1)."""
    fraction = min(max(fraction, 0.0), 1.0)
    return start * (end / start) ** fraction


def leaf_modules(mode: str) -> list[type]:
    """Module types the FX feature extractor must call as opaque leaves for ``mode``."""
    if mode == "lps":
        return [LPD, SamePhase, CircularConv2d]
    if mode == "blurpool":
        from kornia.filters import BlurPool2D

        return [BlurPool2D]
    return []


# ----------------------------------------------------------------------------- conversion
class Downsampler:
    """Rewrites strided layers as the stride-1 layer followed by a down-sampling layer (``blurpool`` or ``lps``).

    Families that take ``downsample=`` (:mod:`encoders.nets.registry`) apply :meth:`conv`,
    :meth:`pool` (or :meth:`sequential`) to their strided layers in their ``downsample_layers``
    hook; :func:`convert_downsampling` then checks that none is left (:meth:`finish`).

    Args:
        mode: ``blurpool`` or ``lps``.
    """

    def __init__(self, mode: str):
        self.mode = mode

    def down(self, channels: int, stride: int) -> nn.Module:
        """The down-sampling layer of this mode: :class:`LPD` or kornia's ``BlurPool2D``."""
        if self.mode == "lps":
            return LPD(channels, stride)
        from kornia.filters import BlurPool2D  # imported on first use: kornia is slow to import

        return BlurPool2D(BLUR_KERNEL, stride)

    @staticmethod
    def stride(m: nn.Module) -> int:
        """The (isotropic) stride of a convolution or pooling layer."""
        s = m.stride if isinstance(m.stride, (tuple, list)) else (m.stride, m.stride)
        if s[0] != s[1]:
            raise RFIError(f"anisotropic stride {tuple(s)} is not supported")
        return int(s[0])

    def conv(self, conv: nn.Conv2d, name: str) -> nn.Module:
        """``conv`` at stride 1 ('same' size) followed by the down-sampling layer."""
        s = self.stride(conv)
        k, p = conv.kernel_size, conv.padding
        if (
            isinstance(p, str)
            or any(kk % 2 == 0 or pp != (kk - 1) // 2 for kk, pp in zip(k, p))
            or conv.dilation != (1, 1)
        ):
            raise RFIError(
                f"cannot use downsample='{self.mode}' at layer '{name}': its {k[0]}x{k[1]} "
                f"stride-{s} convolution with padding {p} has no size-preserving stride-1 form "
                f"(for AlexNet use small_input=True)"
            )
        conv.stride = (1, 1)
        return nn.Sequential(conv, self.down(conv.out_channels, s))

    def pool(self, pool: nn.MaxPool2d, channels: int) -> nn.Module:
        """``pool`` at stride 1 followed by the down-sampling layer."""
        s, k = self.stride(pool), pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
        if self.mode == "lps":  # circular 'same' padding (max-pool has no padding_mode)
            pad = nn.CircularPad2d(((k - 1) // 2, k // 2, (k - 1) // 2, k // 2))
            return nn.Sequential(pad, nn.MaxPool2d(k, 1), self.down(channels, s))
        return nn.Sequential(nn.MaxPool2d(k, 1, pool.padding), self.down(channels, s))  # Zhang's MaxBlurPool

    def sequential(self, model: nn.Module, small_input: bool) -> None:
        """VGG / AlexNet: strided layers of ``model.features``, replaced at the same index (taps keep names)."""
        if self.mode == "lps" and not small_input:
            raise RFIError(
                "cannot use downsample='lps' with this head: layer 'classifier' flattens a fixed "
                "spatial grid (avgpool to 7x7 / 6x6), which no circular shift leaves unchanged; "
                "use small_input=True (global average pooling)"
            )
        channels = 3
        for i, m in enumerate(list(model.features)):
            if isinstance(m, nn.Conv2d):
                if self.stride(m) > 1:
                    model.features[i] = self.conv(m, f"features.{i}")
                channels = m.out_channels
            elif isinstance(m, nn.MaxPool2d) and self.stride(m) > 1:
                model.features[i] = self.pool(m, channels)

    def finish(self, model: nn.Module) -> None:
        """Name the LPD layers, refuse strided layers left over, make LPS padding circular everywhere."""
        total, lpds = 1, lpd_modules(model)
        overall = math.prod(m.stride for m in lpds.values())
        for name, m in model.named_modules():
            if isinstance(m, LPD):
                total *= m.stride
                m.name, m.totals = name, (total, overall)
            elif isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and self.stride(m) > 1:
                raise RFIError(
                    f"cannot use downsample='{self.mode}' at layer '{name}': no rule converts this {type(m).__name__}"
                )
        if self.mode == "lps":  # exact equivariance needs circular padding everywhere
            circular_convs(model, all_padded=True)


def convert_downsampling(model: nn.Module, mode: str, rewrite: Callable[[Downsampler, nn.Module], None]) -> nn.Module:
    """Rebuild the strided layers of ``model`` for ``mode`` (in place; returns it).

    Args:
        model: the network (as a family of :mod:`encoders.nets.registry` builds it).
        mode: ``stride`` (no change), ``blurpool`` or ``lps``.
        rewrite: ``rewrite(down, model)`` replaces the strided layers using the :class:`Downsampler` ``down``
            (the family's ``downsample_layers`` hook).

    Raises:
        RFIError: unknown mode, or a layer the mode cannot take (the error names it).
    """
    if mode not in DOWNSAMPLING:
        raise RFIError(f"unknown downsample '{mode}' (valid: {', '.join(DOWNSAMPLING)})")
    if mode == "stride":
        return model
    down = Downsampler(mode)
    rewrite(down, model)
    down.finish(model)
    return model


def encoder_phases(model: nn.Module, node: str) -> OrderedDict[str, Tensor]:
    """The selection weights the LPD layers before ``node`` chose in the model's last forward pass."""
    modules = lpd_modules(model)
    return OrderedDict(
        (name, modules[name].weights) for name in phase_path(model, node) if modules[name].weights is not None
    )
