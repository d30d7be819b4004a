"""Errors a user can fix: the command line prints their message without a traceback."""


class UserError(ValueError):
    """Bad input (config, data, models); the message says what is wrong and how to fix it."""
