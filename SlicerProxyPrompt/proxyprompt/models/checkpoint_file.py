"""Reading a checkpoint file into a network, refusing any file that is not the network's weights.

`torch.load(weights_only=True)` refuses pickled code; everything a foreign, truncated or malicious file can
raise (unpickling errors, zip errors, wrong shapes) becomes one `CheckpointError` naming the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict

from ..errors import CheckpointError

# Where checkpoints nest their state dict: SAM 2 under "model", Lightning-style files under "state_dict".
_NESTED_KEYS = ("model", "state_dict")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def read_state_dict(path) -> Dict[str, object]:
    """The tensors of a checkpoint (unwrapped from ``{"model": ...}`` / ``{"state_dict": ...}``)."""
    import torch

    path = Path(path)
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, UnicodeDecodeError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be loaded as PyTorch weights ({_first_line(error)})") from None
    for key in _NESTED_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not loaded or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in loaded.items()
    ):
        raise CheckpointError(f"checkpoint {path} holds no state dict of named tensors (a {type(loaded).__name__})")
    return loaded


def load_into(network, state: Dict[str, object], path, strict: bool = True):
    """``network.load_state_dict(state)``; shape mismatches and (strict) missing keys become a `CheckpointError`.
    Returns load_state_dict's (missing, unexpected) keys."""
    try:
        return network.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {path} does not fit the {type(network).__name__} network ({_first_line(error)})"
        ) from None
