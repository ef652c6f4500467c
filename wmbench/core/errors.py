"""Errors that are the user's fault: the CLI prints them as one line and exits with status 2."""


class UserError(ValueError):
    """Bad input (unknown name, impossible size, corrupt file): one clear line, no traceback."""
