"""Errors the user can act on. The CLI turns them into an exit code and a one-line reason (docs/reliability.md)."""


class InputError(ValueError):
    """Bad input: wrong file, wrong shape, unknown name. The message is shown to the user as is (exit 2)."""


class Cancelled(RuntimeError):
    """The user cancelled a run; nothing was written."""


class DownloadError(RuntimeError):
    """A model file could not be fetched or failed verification."""


class CheckpointError(DownloadError):
    """A local checkpoint file that is not the model's: wrong size or checksum, not a PyTorch state dict of the
    model. Nothing was downloaded, so the CLI says "error", not "download failed" (exit 2)."""


class OutputWriteError(RuntimeError):
    """An output could not be written completely (disk full, I/O error): nothing was left behind (exit 1)."""
