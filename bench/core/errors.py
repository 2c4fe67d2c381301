"""Errors that reach the user as one line (exit code 2), not as a traceback."""


class UserError(Exception):
    """Bad input: an unknown name, a missing file, a malformed override. The message says what is valid."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
