"""Errors the user can act on. The CLI turns them into exit code 2 and a one-line reason."""


class InputError(ValueError):
    """Bad input: wrong file, wrong shape, unknown name. The message is shown to the user as is."""


class Cancelled(RuntimeError):
    """The user cancelled a run; nothing was written."""


class DownloadError(RuntimeError):
    """A model file could not be fetched or failed verification."""
