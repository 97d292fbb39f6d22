"""Errors a user can act on: printed as one line, never as a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment, with the fix in the message.

    `exit_code` is 2 for command-line usage errors and 1 for everything else.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(UserError):
    """A bad command-line argument (exit status 2, like argparse)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


class OutOfKVMemory(UserError):
    """The KV budget cannot hold what the run needs."""
