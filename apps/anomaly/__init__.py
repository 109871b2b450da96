"""Anomaly detection with robust autoencoders (``rfi anomaly fit|score``)."""
