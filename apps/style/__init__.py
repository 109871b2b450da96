"""Style transfer in robust feature space (decoder pyramids, WCT/AdaIN) and StyleAugment."""
