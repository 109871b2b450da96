"""The shipped YAML configs, installed as package data (read them with ``encoders.core.config.shipped_config``)."""
