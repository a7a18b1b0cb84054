"""Errors the user can fix: the CLI prints their message as one line and exits with 2."""


class UserError(Exception):
    """Bad input: a malformed file, a wrong parameter value, an unknown run.

    The message is complete on its own (it names the file, row and column where
    there is one) and speaks of parameters as the library names them
    (``sample_rate``), never of command-line flags; ``params`` lists the names it
    mentions, so the CLI can print them as its flags (``--sample-rate``). The CLI
    prints ``error: <message>`` and exits with status 2.
    """

    def __init__(self, message: str, *params: str):
        super().__init__(message)
        self.params = params
