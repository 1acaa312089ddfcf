"""Errors raised by ``jaxalign.models``; each message names the file, field or tensor at fault."""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """A checkpoint's architecture or one of its config options is not supported."""


class CheckpointError(ValueError):
    """A checkpoint directory, weight file or tensor is missing, corrupt or misshaped."""
