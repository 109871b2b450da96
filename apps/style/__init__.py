"""Style in robust feature space: style transfer through a decoder pyramid, and style augmentation.

- :mod:`apps.style.config`: ``configs/apps/style.yaml`` as typed classes (``rfi style train|apply``).
- :mod:`apps.style.pyramid`: train, load a decoder pyramid (one decoder per encoder layer).
- :mod:`apps.style.transfer`: :func:`~apps.style.transfer.stylize`, coarse-to-fine through a pyramid.
- :mod:`apps.style.transforms`: the feature transforms, WCT and AdaIN.
- :mod:`apps.style.augment`: :class:`~apps.style.augment.StyleAugment`, the SASSL batch transform.
- :mod:`apps.style.multiview`: :class:`~apps.style.multiview.MultiView`, N views per image.
- :mod:`apps.style.loader`: :class:`~apps.style.loader.StyledLoader`, stylisation beside the training step.
"""
