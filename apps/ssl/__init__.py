"""Self-supervised learning (SimCLR, MoCo v2) with optional style augmentation (``rfi ssl``)."""
