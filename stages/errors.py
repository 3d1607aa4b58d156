"""The one error type users see: a one-line message saying what is wrong and how to fix it."""

CACHE_NEUTRAL = "the error type users see"


class UserError(ValueError):
    """Bad input. The CLI prints the message alone and exits with status 2."""
