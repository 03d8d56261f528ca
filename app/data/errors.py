"""The error type of the data layer, kept in its own module so every data module can raise it."""

from __future__ import annotations

__all__ = ["CaseError"]


class CaseError(ValueError):
    """A case on disk cannot be used as it is; the message names the file or folder and the fix."""
