"""Errors the user can fix: the CLI prints their message as one line and exits with 2."""


class UserError(Exception):
    """Bad input: a malformed file, a wrong flag value, an unknown run.

    The message is complete on its own (it names the file, row and column where
    there is one); the CLI prints ``error: <message>`` and exits with status 2.
    """
