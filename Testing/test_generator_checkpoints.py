"""Generator checkpoints: metadata round trip, weights-only loading, mismatches refused with a clear message, and the
shared training entry point."""

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from proxyprompt.errors import InputError  # noqa: E402
from proxyprompt.generators import checkpoints  # noqa: E402
from proxyprompt.generators.base import Generator, register_generator  # noqa: E402
from proxyprompt.options import Options, option  # noqa: E402

MODEL = SimpleNamespace(name="litemedsam", image_size=256)


def _meta(**changes):
    values = dict(generator="proxy-prompt", model="litemedsam", image_size=256, label_names={1: "RV", 3: "LV"},
                  num_masks=2, training_data_sha256="ab" * 32)
    values.update(changes)
    return checkpoints.GeneratorCheckpointMeta(**values)


def test_round_trip_and_mismatches_are_refused(tmp_path):
    path = checkpoints.save_generator_checkpoint(tmp_path / "w.pt", _meta(), {"proj.weight": torch.arange(6.0).reshape(2, 3)})
    meta, tensors = checkpoints.load_generator_checkpoint(path, "proxy-prompt", MODEL)
    assert meta == _meta() and torch.equal(tensors["proj.weight"], torch.arange(6.0).reshape(2, 3))
    assert list(tmp_path.iterdir()) == [path]  # nothing half-written left beside it
    with pytest.raises(InputError, match="trained for model 'litemedsam' at 256 px.*'sam2.1_hiera_tiny' at 1024 px"):
        checkpoints.load_generator_checkpoint(path, "proxy-prompt", SimpleNamespace(name="sam2.1_hiera_tiny",
                                                                                    image_size=1024))
    with pytest.raises(InputError, match="at 256 px.*'litemedsam' at 512 px"):
        checkpoints.load_generator_checkpoint(path, "proxy-prompt", SimpleNamespace(name="litemedsam", image_size=512))
    with pytest.raises(InputError, match="weights of generator 'proxy-prompt', not 'sgp'"):
        checkpoints.load_generator_checkpoint(path, "sgp", MODEL)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_files_that_are_not_plain_tensors_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoints.FORMAT, "version": 1, "meta": {}, "tensors": {"x": _Payload()}}, evil)
    with pytest.raises(InputError, match="not a generator checkpoint this engine reads"):
        checkpoints.read_generator_checkpoint(evil)
    other = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, other)
    with pytest.raises(InputError, match="not a proxyprompt generator checkpoint"):
        checkpoints.read_generator_checkpoint(other)
    incomplete = tmp_path / "incomplete.pt"
    torch.save({"format": checkpoints.FORMAT, "version": 1, "meta": {"generator": "x"}, "tensors": {}}, incomplete)
    with pytest.raises(InputError, match="metadata is incomplete"):
        checkpoints.read_generator_checkpoint(incomplete)


@dataclass(frozen=True)
class _ScaleOptions(Options):
    scale: float = option(2.0, "what the toy training multiplies", float)


@register_generator
class _ToyTrained(Generator):
    name = "toy-trained"
    needs_training = True
    Options = _ScaleOptions

    def train(self, references, model, options, progress=None, cancel=None, job=None):
        labels = sorted({int(v) for r in references for v in np.unique(r.label.array) if v})
        return checkpoints.TrainedWeights({"scale": torch.full((len(labels),), options.scale)}, num_masks=len(labels))


def test_train_generator_writes_a_registered_checkpoint(tmp_path, monkeypatch):
    from proxyprompt.contract import ReferenceCase
    from proxyprompt.volume import LabelInfo, Volume

    monkeypatch.setenv("PROXYPROMPT_HOME", str(tmp_path / "home"))
    image = Volume.from_geometry(np.zeros((2, 4, 4), np.float32), (1, 1, 1), (0, 0, 0))
    label = image.with_array(np.array([[[0, 1, 2, 0]] * 4] * 2, np.uint8))
    table = {1: LabelInfo("RV", (1, 0, 0)), 2: LabelInfo("MYO", (0, 1, 0))}
    data = tmp_path / "case.nii.gz"
    data.write_bytes(b"training data")
    path = checkpoints.train_generator("toy-trained", [ReferenceCase(image, label, table)], MODEL, [data],
                                       options={"scale": 3.0})
    assert checkpoints.find_generator_checkpoint("toy-trained", MODEL) == path
    meta, tensors = checkpoints.load_generator_checkpoint(path, "toy-trained", MODEL)
    assert meta.label_names == {1: "RV", 2: "MYO"} and meta.num_masks == 2
    assert meta.training_data_sha256 == checkpoints.training_data_hash([data])
    assert torch.equal(tensors["scale"], torch.full((2,), 3.0))
    assert [row["generator"] for row in checkpoints.list_generator_checkpoints()] == ["toy-trained"]
    data.write_bytes(b"other data")
    assert checkpoints.training_data_hash([data]) != meta.training_data_sha256
    with pytest.raises(InputError, match="has no trained weights"):
        checkpoints.train_generator("registration", [], MODEL, [data])
