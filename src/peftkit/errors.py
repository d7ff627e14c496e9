"""The one exception type peftkit raises for problems the user can fix (bad config, bad file, bad input)."""

from __future__ import annotations


class PeftkitError(ValueError):
    """A user-facing error; the CLI prints it as one line."""
