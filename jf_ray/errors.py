"""Errors raised at the edges (CLI, config, HTTP) for bad input. Each message names what is wrong."""


class UserInputError(ValueError):
    """Bad input from a user: a missing file, an invalid argument, an unknown name.

    The CLI turns it into exit code 2 and one line on stderr; the server into an HTTP 4xx.
    """
