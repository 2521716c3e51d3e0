"""The one error type users see: a message naming the file, field or flag, and what to do."""


class UserError(ValueError):
    """Bad input from the user (flag, config file, data, checkpoint); the CLI prints it and exits 2."""
