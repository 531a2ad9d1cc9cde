"""Next-token targets: targets[t] = the token to predict at position t, IGNORE where there is no loss."""
from __future__ import annotations

import numpy as np

IGNORE = -100


def shift_targets(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """target[t] = ids[t+1] where token t+1 is trainable, else -100; the last token has no target."""
    targets = np.full(len(ids), IGNORE, np.int64)
    targets[:-1] = np.where(mask[1:], ids[1:], IGNORE)
    return targets
