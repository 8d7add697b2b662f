"""The one exception type the CLI turns into a single stderr line and exit code 2."""


class CaitoolError(Exception):
    """A problem with the user's input or environment, reported as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
