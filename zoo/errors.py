"""Error types the CLI reports as one line with exit code 2 (mistakes in input, not bugs)."""
from __future__ import annotations


class ZooError(ValueError):
    """Base of the user-facing errors: the message names the problem and the fix."""


class ConfigError(ZooError):
    """A configuration mistake: unknown key, wrong type, missing config file, inconsistent values."""


class CheckpointError(ZooError):
    """A missing, truncated, foreign or mismatched checkpoint or export directory."""


class DataError(ZooError):
    """A data problem: missing file, a hub id while offline, a missing data package."""
