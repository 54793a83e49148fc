"""Errors a user can fix: reported as one line with exit code 2 by the CLI."""


class UsageError(Exception):
    """Invalid input: a bad config value, a missing file, an impossible partition."""
