"""A generator's own trained files (proxy-prompt's prompt network, SAM2-SGP's LoRA): small torch files with metadata.

One file = {"format": FORMAT, "version": VERSION, "meta": {...}, "tensors": {name: Tensor}}, read with
`torch.load(weights_only=True)` (plain containers and tensors only: nothing in the file can run code). The metadata
says what the weights were trained for: the generator, the model and its input size (the weights read that model's
features), the label names, the number of masks, and a SHA-256 of the training data. A model other than the one
trained for is refused with a message naming both.

Training is shared: a trainable generator implements `Generator.train(references, model, options, progress, cancel)
-> TrainedWeights`; `train_generator` runs it and writes the checkpoint (atomically) where `find_generator_checkpoint`
looks, so a `proxyprompt train --generator NAME` command is one call for every trained generator.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import InputError
from ..options import TrainingOptions

FORMAT = "proxyprompt-generator-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class GeneratorCheckpointMeta:
    generator: str  # registry name of the generator that reads the file
    model: str  # registry name of the model whose features it was trained on
    image_size: int  # that model's input size
    label_names: Dict[int, str]  # label value -> name it was trained for
    num_masks: int  # annotated slices (masks) it was trained on
    training_data_sha256: str  # `training_data_hash` of the training files

    def to_dict(self) -> dict:
        data = asdict(self)
        data["label_names"] = {str(k): v for k, v in self.label_names.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "GeneratorCheckpointMeta":
        try:
            return cls(generator=str(data["generator"]), model=str(data["model"]), image_size=int(data["image_size"]),
                       label_names={int(k): str(v) for k, v in dict(data["label_names"]).items()},
                       num_masks=int(data["num_masks"]), training_data_sha256=str(data["training_data_sha256"]))
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"generator checkpoint metadata is incomplete or malformed ({error})") from None


@dataclass(eq=False)
class TrainingJob:
    """How to train, the same for every trainable generator (`proxyprompt train`): the typed training options,
    the tensors of a checkpoint to continue from (`--resume`, already checked to be this generator's for this model),
    where each step's record goes (`{"step": ..., "loss": ...}`, the JSON-lines log) and the autocast precision of the
    training passes (bf16 on CUDA)."""

    options: TrainingOptions = field(default_factory=TrainingOptions)
    resume: Optional[Dict[str, object]] = None
    log: Optional[Callable[[dict], None]] = None
    precision: str = "fp32"


@dataclass(eq=False)
class TrainedWeights:
    """What `Generator.train` returns: the tensors to store and the number of masks they predict."""

    tensors: Dict[str, object]  # name -> torch.Tensor
    num_masks: int


def training_data_hash(paths: Sequence) -> str:
    """SHA-256 over the training files' names and contents (order-independent)."""
    from ..models.registry import sha256_file

    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def checkpoint_dir() -> Path:
    """``$PROXYPROMPT_HOME/generators`` (default ``~/.proxyprompt/generators``), beside the model cache."""
    from ..models.registry import cache_dir

    return cache_dir().parent / "generators"


def checkpoint_filename(generator: str, model: str, image_size: int) -> str:
    return f"{generator}--{model}--{int(image_size)}.pt"


def save_generator_checkpoint(path, meta: GeneratorCheckpointMeta, tensors: Dict[str, object]) -> Path:
    """Write the checkpoint atomically (a reader never sees half a file)."""
    import torch

    from ..volume import atomic_write

    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise InputError(f"generator checkpoint tensors must be str -> torch.Tensor, got {name!r}")
    payload = {"format": FORMAT, "version": VERSION, "meta": meta.to_dict(),
               "tensors": {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda temporary: torch.save(payload, temporary))


def read_generator_checkpoint(path):
    """(meta, tensors) of a checkpoint file, without checking what it is for."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"generator checkpoint not found: {path}")
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path} is not a generator checkpoint this engine reads ({first_line})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path} is not a proxyprompt generator checkpoint")
    if payload.get("version") != VERSION:
        raise InputError(f"{path} is generator checkpoint version {payload.get('version')}; this engine reads "
                         f"version {VERSION}")
    return GeneratorCheckpointMeta.from_dict(payload.get("meta") or {}), dict(payload.get("tensors") or {})


def load_generator_checkpoint(path, generator: str, model):
    """(meta, tensors) of a checkpoint for `generator` running on `model` (a SliceModel); a file trained for another
    generator, model or image size is refused with a message that names both."""
    meta, tensors = read_generator_checkpoint(path)
    if meta.generator != generator:
        raise InputError(f"{path} holds weights of generator '{meta.generator}', not '{generator}'")
    if model is None or meta.model != model.name or meta.image_size != int(model.image_size):
        running = "no model" if model is None else f"model '{model.name}' at {model.image_size} px"
        raise InputError(f"{path} was trained for model '{meta.model}' at {meta.image_size} px, but the engine runs "
                         f"{running}: use that model, or train for this one")
    return meta, tensors


def find_generator_checkpoint(generator: str, model) -> Optional[Path]:
    """The registered checkpoint of `generator` for `model` in `checkpoint_dir()`, or None."""
    if model is None:
        return None
    path = checkpoint_dir() / checkpoint_filename(generator, model.name, model.image_size)
    return path if path.is_file() else None


def list_generator_checkpoints() -> List[dict]:
    """Metadata of every readable checkpoint in `checkpoint_dir()`, with its path."""
    folder = checkpoint_dir()
    rows = []
    for path in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
        try:
            meta, _ = read_generator_checkpoint(path)
        except InputError:
            continue
        rows.append(dict(meta.to_dict(), path=str(path)))
    return rows


def train_generator(generator_name: str, references, model, training_files: Sequence, options=None,
                    output=None, progress=None, cancel=None, job: Optional[TrainingJob] = None) -> Path:
    """Train a generator's own weights on `references` (ReferenceCase list) with `model`'s features and write its
    checkpoint (default: where `find_generator_checkpoint` looks). `training_files`: the files the references came
    from (hashed into the metadata); `job`: training options, resume state, step log, precision."""
    from .base import get_generator

    generator = get_generator(generator_name)
    if not generator.needs_training:
        raise InputError(f"generator '{generator_name}' has no trained weights")
    if model is None:
        raise InputError(f"training generator '{generator_name}' needs a model (its weights read the model's features)")
    trained = generator.train(list(references), model, generator.Options.parse(options), progress, cancel,
                              job or TrainingJob())
    label_names = {}
    for reference in references:
        for value, info in reference.table.items():
            label_names.setdefault(int(value), getattr(info, "name", str(value)))
    meta = GeneratorCheckpointMeta(generator=generator.name, model=model.name, image_size=int(model.image_size),
                                   label_names=label_names, num_masks=int(trained.num_masks),
                                   training_data_sha256=training_data_hash(training_files))
    output = Path(output) if output else checkpoint_dir() / checkpoint_filename(generator.name, model.name,
                                                                                 model.image_size)
    return save_generator_checkpoint(output, meta, trained.tensors)

