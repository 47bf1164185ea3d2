"""The error a bad option or bad training data raises before any model is loaded (config and data share it)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, reported before any model is loaded; the message names the option."""
