"""Robustness: adversarial attacks, adversarial (and standard) encoder training, accuracy under
attack and shift consistency."""
