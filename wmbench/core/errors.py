"""Errors that are the user's fault: the CLI prints them as one line and exits with status 2."""


class UserError(ValueError):
    """Bad input (unknown name, impossible size, corrupt file): one clear line, no traceback."""


def one_line(message: str) -> str:
    """The first line of a message, with any other control character (a user's input echoed back)
    escaped, so an error is always exactly one line."""
    first = message.strip().split("\n")[0]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in first)
