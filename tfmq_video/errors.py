"""Exceptions raised on bad input; each message says what was wrong and what to do."""

from __future__ import annotations


class TFMQError(Exception):
    """Base class of the errors tfmq-video raises for bad input."""


class CheckpointError(TFMQError, ValueError):
    """A checkpoint folder or file is missing, corrupt or does not fit the model."""


class ConfigError(TFMQError, ValueError):
    """A configuration value is invalid."""
