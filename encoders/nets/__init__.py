"""Encoder architectures, one family per module, and the registry that knows them (:mod:`encoders.nets.registry`).

Importing this package registers the families below, in listing order (CNNs, then
transformers); a new architecture is a new module here, imported on the line below.
:class:`encoders.nets.models.Encoder` taps any of them at named layers;
:func:`encoders.create_encoder` builds or loads one by name.
"""

from encoders.nets import alexnet, vgg, resnet, swin, mvit, cvt  # noqa: F401, I001  (each module registers its family)
