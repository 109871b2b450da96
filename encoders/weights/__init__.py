"""Weights: RFI's checkpoint format, interop with torchvision and the `robustness` library, and
the model zoo (``rfi weights``)."""
