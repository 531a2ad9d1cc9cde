"""Error types raised by several components (here, below all of them, so none imports another for its errors)."""


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be used as asked; the message says which and what to do."""
