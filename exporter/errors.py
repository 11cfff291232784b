"""The one exception type for mistakes a user can fix: printed as one line, exit code 2."""


class UserError(Exception):
    """Bad input: say what, where, and what was expected. The CLI prints it and exits 2."""
