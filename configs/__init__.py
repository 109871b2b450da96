"""The shipped YAML configs, installed as package data (read them with ``encoders.config.shipped_config``)."""
