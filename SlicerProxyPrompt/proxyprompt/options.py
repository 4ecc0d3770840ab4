"""Typed, validated options: one dataclass for the engine and one per generator; unknown options are an error.

Each field is declared with `option(default, help, ...)`; the CLI builds its flags from these declarations
(`cli_arguments`), so a front end cannot drift from the engine. Values are validated when an options object is made,
and `Options.parse` turns a dict (a JSON request, a Python call) into one, refusing names the class does not have.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Dict, Iterator, Optional, Sequence, Tuple

from .errors import InputError


def option(default, help: str, kind: type, choices: Optional[Sequence] = None, minimum: Optional[float] = None,
           maximum: Optional[float] = None):
    """A dataclass field with what validation and the CLI need: its type (int, float, str), allowed values, range."""
    metadata = {"help": help, "kind": kind, "choices": tuple(choices) if choices else None, "minimum": minimum,
                "maximum": maximum}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Options:
    """Base of every options dataclass: validates its fields (type, choices, range) on construction."""

    def __post_init__(self) -> None:
        for spec in fields(self):
            meta = spec.metadata
            value = getattr(self, spec.name)
            if value is None and spec.default is None:
                continue
            kind = meta.get("kind")
            name = f"{spec.name} (--{spec.name.replace('_', '-')})"  # the field and its CLI flag
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, spec.name, value)
            if kind is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
                raise InputError(f"option {name} must be {kind.__name__}, got {value!r}")
            if meta.get("choices") and value not in meta["choices"]:
                raise InputError(f"option {name} must be one of {', '.join(map(str, meta['choices']))}, "
                                 f"got {value!r}")
            if meta.get("minimum") is not None and value < meta["minimum"]:
                raise InputError(f"option {name} must be at least {meta['minimum']}, got {value!r}")
            if meta.get("maximum") is not None and value > meta["maximum"]:
                raise InputError(f"option {name} must be at most {meta['maximum']}, got {value!r}")

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(spec.name for spec in fields(cls))

    @classmethod
    def parse(cls, value, owner: str = ""):
        """None -> the defaults; an instance -> itself; a dict -> validated (unknown names refused)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Options):
            raise InputError(f"{type(value).__name__} given where {owner or 'this'} takes {cls.__name__}")
        if not isinstance(value, dict):
            raise InputError(f"options must be a dict or {cls.__name__}, got {type(value).__name__}")
        unknown = sorted(set(value) - set(cls.names()))
        if unknown:
            where = f" for {owner}" if owner else ""
            raise InputError(f"unknown option(s){where}: {', '.join(unknown)}; known: "
                             f"{', '.join(cls.names()) or 'none'}")
        return cls(**value)

    def to_dict(self) -> dict:
        return {spec.name: getattr(self, spec.name) for spec in fields(self)}


@dataclass(frozen=True)
class NoOptions(Options):
    """A generator without options."""


DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
FUSIONS = ("vote", "staple", "mean")
REGISTRATION_METHODS = ("copy", "centred", "located", "affine", "deformable", "intensity")


@dataclass(frozen=True)
class EngineOptions(Options):
    """The engine's own options: how the model is built (read when an Engine is made) and, per run, how several
    references are fused and how many refinement rounds a generator may ask for."""

    device: str = option("auto", "where the model runs; auto = CUDA, then Apple MPS, then CPU", str, DEVICES)
    precision: str = option("auto", "model arithmetic; auto = bf16 on CUDA and on CPUs with "
                                    "Intel AMX, else fp32", str, PRECISIONS)
    image_size: Optional[int] = option(None, "model input size (SAM 2: 1024 or 512)", int, minimum=64)
    fusion: str = option("vote", "label fusion of several references (mean: of the soft warped maps)", str, FUSIONS)
    fusion_top_k: Optional[int] = option(None, "fuse the k references whose warped labels agree best "
                                               "(default: 3 when more than 3 are given)", int, minimum=1)
    refinement_rounds: int = option(3, "most refinement rounds a generator may ask for", int, minimum=0)

    MODEL_FIELDS = ("device", "precision", "image_size")  # fixed once the Engine's model is built


@dataclass(frozen=True)
class TrainingOptions(Options):
    """How a trainable generator is trained (`proxyprompt train`; the same for every trained generator)."""

    max_masks: int = option(16, "most annotated slices (masks) taken from the training cases", int, minimum=1)
    steps: Optional[int] = option(None, "optimisation steps in all (default: the generator's own; with --resume, "
                                        "training continues up to this count)", int, minimum=1)
    seed: int = option(0, "random seed of the training episodes and initial weights", int, minimum=0)


def default_generator(model_family: str) -> str:
    """The generator measured best with a model family: the engine's and every front end's "auto".

    * no model: registration, the only generator that gives a segmentation without one;
    * a memory-less SAM-family model (LiteMedSAM, SAM ViT): registration, its prior refined by the model where the
      model is stable (`generators.prior_refinement`). Measured on both shared anatomies with LiteMedSAM
      (docs/benchmarks.md, "Each generator with LiteMedSAM"): on the hippocampus support-memory's 2D slice
      alignment gave 0.39 mean Dice against 0.80 (selection pairs); on ACDC ED the two were on par;
    * SAM 2 (memory): support-memory, reference slices as conditioning memory (SAM2-SGP's form). Its accuracy
      cannot be measured here (no SAM 2 weights): the design's choice, not a measurement."""
    if model_family in ("sam2", "random"):
        return "support-memory"
    return "registration"


def default_fusion_top_k(top_k: Optional[int], references: int) -> Optional[int]:
    """Fuse the 3 references whose warped labels agree best when more than 3 are given (docs/benchmarks.md:
    ACDC ED, best 3 of 19 references 0.788 vs 0.615 for one)."""
    if top_k is not None:
        if top_k < 1:
            raise InputError(f"--fusion-top-k must be at least 1, got {top_k}")
        return top_k
    return 3 if references > 3 else None


def cli_arguments(cls, defaults: bool = True) -> Iterator[Tuple[str, dict]]:
    """(flag, argparse keyword arguments) for each field of an options class: `--image-size` for `image_size`.
    defaults=False: flags not given are absent from the parsed namespace (argparse.SUPPRESS)."""
    import argparse

    for spec in fields(cls):
        meta = spec.metadata
        kwargs = {"dest": spec.name, "type": meta["kind"], "help": meta["help"]}
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        default = spec.default if spec.default is not MISSING else None
        kwargs["default"] = default if defaults else argparse.SUPPRESS
        yield "--" + spec.name.replace("_", "-"), kwargs


def merged_cli_arguments(classes) -> Dict[str, dict]:
    """Flags of several options classes (the generators'): one flag per field name; a name declared twice must be
    declared alike (same type and choices), else it is a programming error."""
    merged: Dict[str, dict] = {}
    for cls in classes:
        for flag, kwargs in cli_arguments(cls, defaults=False):
            if flag in merged:
                old = merged[flag]
                if old["type"] is not kwargs["type"] or old.get("choices") != kwargs.get("choices"):
                    raise TypeError(f"option {kwargs['dest']} is declared differently by two generators")
                continue
            merged[flag] = kwargs
    return merged
