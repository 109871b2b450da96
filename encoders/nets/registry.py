"""The registry of encoder architectures: one entry per family, looked up by architecture name.

A *family* (AlexNet, VGG, ResNet, Swin/SwinV2, ...) is a subclass of :class:`EncoderFamily`
in its own module of :mod:`encoders.nets`, registered with :func:`register_encoder`; the
package ``encoders/nets/__init__.py`` imports those modules, in listing order. The family
says how to build its networks (with the width and small-input options), which layers
they are tapped at, which options it takes, and how foreign checkpoints map onto its
modules. :class:`encoders.nets.models.Encoder` (normalisation, taps, shift-equivariant
variants), :mod:`encoders.weights.interop` and :func:`encoders.create_encoder` work from
the entry alone, so a new architecture is one new module (see ``docs/encoders.md``).

Example:
    >>> list_encoders()[:5]
    ['alexnet', 'vgg16', 'vgg19', 'resnet18', 'resnet50']
    >>> encoder_family("resnet18").classifier
    'fc'
    >>> encoder_family("resnet19")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    encoders.core.errors.RFIError: unknown architecture 'resnet19' (valid: alexnet, vgg16, vgg19, resnet18, ...)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from encoders.core.errors import RFIError

if TYPE_CHECKING:
    from encoders.nets.downsample import Downsampler

_FAMILIES: dict[str, EncoderFamily] = {}  # architecture name -> its family, in registration (= listing) order


@dataclass
class Built:
    """What :meth:`EncoderFamily.build` returns.

    Args:
        model: the classifier network (input: normalised images).
        taps: ``{layer name: module name in model}``, shallow to deep.
        options: the family options as they are stored in the encoder's config (defaults
            resolved), so that ``Encoder(**encoder.config())`` builds the same network.
    """

    model: nn.Module
    taps: OrderedDict[str, str]
    options: dict[str, Any] = field(default_factory=dict)


class EncoderFamily:
    """One family of architectures: how to build, tap and load them. Subclass it and register it.

    Class attributes and hooks a family sets (the hooks set to ``None`` here are optional):

    - ``architectures``: the names it builds (``resnet18``, ``resnet50``).
    - ``options``: the keyword options it takes beyond ``num_classes``, ``width`` and
      ``small_input``, with their defaults; the default is the value that means "not given",
      which every other family accepts and ignores (so one config section fits all).
    - ``classifier``: the module name of its last linear layer (``num_classes`` is read off it).
    - ``convolutional``: features are local (convolutions and pooling only), so a tile of the
      image gives a tile of the features away from its border; ``False`` for attention.
    - ``robustness_names``: module prefixes the ``robustness`` library names otherwise, ``{ours: theirs}``.
    - :meth:`build` (required), :meth:`infer_kwargs`, :meth:`checkpoint_filter_fn`, :meth:`max_image_size`.
    - ``downsample_layers(down, model, small_input)``: rewrite the strided layers with the
      :class:`~encoders.nets.downsample.Downsampler` ``down`` (families that take
      ``downsample='blurpool'|'lps'``).
    - ``features(model, x, taps, names)``: the tapped maps as (B, C, H, W), for families whose
      taps torchvision's FX feature extractor cannot give (default: the FX extractor).
    - Families with an ``equivariant`` option: :meth:`size_multiple`, :meth:`check_image_size`,
      :meth:`phase_names` and :meth:`phases` of the equivariant networks.
    """

    architectures: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[Mapping[str, Any]] = {}
    classifier: ClassVar[str] = "fc"
    convolutional: ClassVar[bool] = True
    robustness_names: ClassVar[Mapping[str, str]] = {}
    downsample_layers: Callable[[Downsampler, nn.Module, bool], None] | None = None
    features: Callable[..., OrderedDict[str, Tensor]] | None = None

    def build(self, arch: str, num_classes: int, width: float, small_input: bool, **options: Any) -> Built:
        """The network of ``arch`` and its taps.

        Args:
            arch: one of :attr:`architectures`.
            num_classes: size of the classification head.
            width: channel multiplier (> 0; see :func:`scaled`).
            small_input: the small-input variant (3x3 stride-1 stem, no stem max-pool, global pooling head).
            **options: the family's :attr:`options` (all of them, defaults filled in).
        """
        raise NotImplementedError

    def infer_kwargs(self, state: Mapping[str, Tensor]) -> dict[str, Any]:
        """Constructor arguments (``width``, ``small_input``, family options) read off a state dict in
        our key layout (``model.*``); empty when the weights do not say."""
        return {}

    def checkpoint_filter_fn(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Adapt a foreign state dict, already in our layout (``model.*``, ``normalizer.*``), to this
        family's module names. Default: undo :attr:`robustness_names`."""
        theirs_to_ours = {f"model.{theirs}": f"model.{ours}" for ours, theirs in self.robustness_names.items()}
        return {rename_prefix(k, theirs_to_ours): v for k, v in state.items()}

    def size_multiple(self, options: Mapping[str, Any]) -> int:
        """Equivariant networks: image height and width must be multiples of this."""
        return 1

    def max_image_size(self, options: Mapping[str, Any]) -> int | None:
        """The largest image side the network takes (``None``: no limit; MViTv2: its ``img_size``)."""
        return None

    def check_image_size(self, h: int, w: int, arch: str, options: Mapping[str, Any]) -> None:
        """Equivariant networks: refuse (one line) an image size they cannot take."""
        m = self.size_multiple(options)
        if h % m or w % m:
            raise RFIError(
                f"image size {h}x{w} does not fit the equivariant {arch}: height and width must be "
                f"multiples of {m}, e.g. {-(-h // m) * m}x{-(-w // m) * m}"
            )

    def phase_names(self, model: nn.Module, node: str) -> list[str]:
        """Equivariant networks: names of the stride-2 phase choices made before module ``node``, shallow first."""
        raise NotImplementedError(f"{type(self).__name__} has no equivariant phases")

    def phases(self, model: nn.Module, node: str) -> OrderedDict[str, Tensor]:
        """Equivariant networks: the (B, 4) phase weights chosen before ``node`` in the last forward pass."""
        raise NotImplementedError(f"{type(self).__name__} has no equivariant phases")


def rename_prefix(key: str, prefixes: Mapping[str, str]) -> str:
    """``key`` with its first matching prefix of ``{old: new}`` replaced (unchanged if none matches)."""
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def register_encoder(family: type[EncoderFamily]) -> type[EncoderFamily]:
    """Class decorator: register ``family`` under each of its ``architectures`` (in listing order).

    Raises:
        ValueError: a name another family has, or an option another family declares with another default.
    """
    entry = family()
    defaults = option_defaults()
    clash = [k for k, v in family.options.items() if k in defaults and defaults[k] != v]
    for name in family.architectures:
        old = _FAMILIES.get(name)
        if old is not None and (type(old).__module__, type(old).__qualname__) != (
            family.__module__,
            family.__qualname__,
        ):
            raise ValueError(f"architecture '{name}' is registered by {type(old).__qualname__} already")
    if clash:
        raise ValueError(f"{family.__qualname__}: option(s) {', '.join(clash)} have another default in another family")
    for name in family.architectures:
        _FAMILIES[name] = entry
    return family


def list_encoders() -> list[str]:
    """Every registered architecture name, in listing order (CNNs, then transformers)."""
    return list(_FAMILIES)


def encoder_family(name: str) -> EncoderFamily:
    """The family that builds architecture ``name``.

    Raises:
        RFIError: an unknown name (the one line lists the valid ones).
    """
    if name not in _FAMILIES:
        raise RFIError(f"unknown architecture '{name}' (valid: {', '.join(_FAMILIES)})")
    return _FAMILIES[name]


def option_defaults() -> dict[str, Any]:
    """Every family option with its default (the value that means "not given")."""
    return {k: v for family in _FAMILIES.values() for k, v in family.options.items()}


def family_options(arch: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` checked for ``arch``: its family's options with defaults filled in.

    Another family's option at its default is dropped (a shared config gives all of them).

    Raises:
        RFIError: an option of other architectures only (naming them), or one no family takes.
    """
    family, defaults = encoder_family(arch), option_defaults()
    unknown = sorted(k for k in options if k not in defaults)
    if unknown:
        general = ["num_classes", "width", "small_input", "layers", "downsample"]
        if family.downsample_layers is None:
            general.remove("downsample")
        valid = ", ".join([*general, *family.options])
        raise RFIError(f"unknown Encoder settings {', '.join(unknown)} for {arch} (valid: {valid})")
    for key, value in options.items():
        if key not in family.options and value != defaults[key]:
            shown = f"{key}={value!r}" if isinstance(value, bool) else key
            raise RFIError(f"{shown}: only for {' / '.join(architectures_with(key))}, not {arch}")
    return {**family.options, **{k: v for k, v in options.items() if k in family.options}}


def architectures_with(option: str) -> list[str]:
    """The architectures whose family takes ``option`` (``downsample``: those with ``downsample_layers``)."""
    if option == "downsample":
        return [name for name, family in _FAMILIES.items() if family.downsample_layers is not None]
    return [name for name, family in _FAMILIES.items() if option in family.options]


def encoder_options(options: Mapping[str, Any] | None, key: str = "options") -> dict[str, Any]:
    """Check the family options of a config section (``model.options``) by name; returns a dict.

    Whether an option fits the chosen architecture is checked when the encoder is built.

    Raises:
        RFIError: an unknown key (naming it, ``key`` and the valid ones).
    """
    options, valid = dict(options or {}), sorted(option_defaults())
    bad = sorted(set(options) - set(valid))
    if bad:
        raise RFIError(f"unknown {key} {', '.join(bad)} (valid: {', '.join(valid)})")
    return options


def scaled(channels: int, width: float) -> int:
    """``channels`` times the ``width`` option, rounded, at least 1 (how every family applies ``width``)."""
    return max(1, int(round(channels * width)))
