"""Shift-equivariant semantic segmentation on RFI's encoder core (``rfi segment train | apply``).

- :mod:`apps.segment.model`: :class:`~apps.segment.model.Segmenter` (an encoder and a class-logit
  decoder that up-samples at the encoder's recorded phases) and its model file;
- :mod:`apps.segment.train`: training on the shared scaffold (cross-entropy; frozen or fine-tuned encoder);
- :mod:`apps.segment.metrics`: mIoU and circular / crop mASC;
- :mod:`apps.segment.apply`: label-map PNGs of image files;
- :mod:`apps.segment.config` and :mod:`apps.segment.data`: ``configs/apps/segment.yaml`` and its datasets
  (procedural scenes, PASCAL VOC).

See ``docs/segmentation.md``.
"""
