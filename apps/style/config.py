"""The style-transfer app's settings: ``configs/apps/style.yaml`` as typed classes.

:class:`StyleConfig` is the whole file. ``rfi style train`` reads its top level (the layers
of the pyramid, the ``train:`` decoder-training config they share, ``per_layer`` overrides,
the model file ``out``); ``rfi style apply`` reads its ``apply:`` section
(:class:`StyleApplyConfig`) and, unless ``--model`` names another, the model file ``out``
that training wrote. The defaults are the shipped YAML's.

Example:
    >>> from encoders.core.config import load_config
    >>> cfg = load_config(StyleConfig, None, ["apply.method=adain", "apply.alpha=0.8"])
    >>> cfg.apply.method, cfg.apply.alpha, cfg.out
    ('adain', 0.8, 'runs/style/pyramid.pt')
    >>> load_config(StyleConfig, None, ["apply.alpha=2"])
    Traceback (most recent call last):
    encoders.core.errors.RFIError: config key 'apply.alpha' in the command-line overrides must be in [0, 1], got 2.0
"""

from __future__ import annotations

from typing import Any

from apps.style.transforms import Method
from encoders.core.config import bounded, yaml_dataclass
from inversion.train import TrainDecoderConfig

DEFAULT_CONFIG = "configs/apps/style.yaml"


@yaml_dataclass("apps/style.yaml", "apply")
class StyleApplyConfig:
    """How ``rfi style apply`` stylises (the ``apply:`` section; command-line flags win).

    ``method``: ``wct`` or ``adain``. ``alpha``: content-style trade-off at every layer (0: the
    plain chained reconstruction, 1: full style). ``preserve_color``: transfer only the
    luminance. ``size``: resize contents so the longer side is this many px (``null``: as
    they are). ``style_size``: longer side of the styles (``null``: the content's). ``layers``:
    pyramid layers to use (``null``: all). ``device``: ``auto``, ``cpu``, ``cuda``, ...
    ``model``: the pyramid applied: ``shipped:NAME`` (default: RFI's shipped pyramid), a file,
    or ``null``: the config's ``out`` (where ``rfi style train`` writes).
    """

    model: str | None
    method: Method
    alpha: float = bounded(low=0, high=1)
    preserve_color: bool
    size: int | None = bounded(low=1)
    style_size: int | None = bounded(low=1)
    layers: list[str] | None
    device: str


@yaml_dataclass("apps/style.yaml")
class StyleConfig:
    """A decoder pyramid and how to apply it (YAML: ``configs/apps/style.yaml``).

    ``layers``: the encoder layers that get a decoder. ``train``: the ``rfi train-decoder``
    config every layer shares (encoder checkpoint, decoder shape, data, losses, steps); its
    ``encoder.layer`` and ``out`` are set per layer. ``per_layer``: overrides for single
    layers, ``{layer: {dotted.key: value}}`` (e.g. ``{layer1: {decoder.channels: 32}}``).
    ``out``: the pyramid model file. ``runs``: folder of the per-layer training runs
    (``<runs>/<layer>/decoder.pt``; default ``<out without suffix>_decoders``). ``apply``:
    :class:`StyleApplyConfig`.
    """

    layers: list[str]
    train: TrainDecoderConfig
    per_layer: dict[str, Any]
    out: str
    runs: str | None
    apply: StyleApplyConfig
