"""proxy-prompt generator (issue 15): module shapes, the selective scan, training, checkpoints, inference, CLI.

Models with random weights (`random` = SAM 2.1 Hiera-T at 512 px, SAM ViT-B at 256 px) test the mechanics; they say
nothing about accuracy (benchmarks/proxy_prompt.py measures that with LiteMedSAM's real weights)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import crop_slices

TRAINING_PATIENTS = ("patient001", "patient002", "patient008")


def _files(acdc, patients):
    return [(acdc / f"{p}_ED_image.nii.gz", acdc / f"{p}_ED_label.nii.gz") for p in patients]


@pytest.fixture(scope="module")
def random_sam2():
    from proxyprompt.models.loader import load_model

    return load_model("random", image_size=512, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def trained(acdc, random_sam2, tmp_path_factory):
    """30 steps on 16 real ACDC ED slices (3 patients) with the random SAM 2: (checkpoint path, step records)."""
    from proxyprompt.cases import load_reference_case
    from proxyprompt.generators.checkpoints import TrainingJob, train_generator
    from proxyprompt.options import TrainingOptions

    files = _files(acdc, TRAINING_PATIENTS)
    cases = [load_reference_case(image, label) for image, label in files]
    records = []
    job = TrainingJob(options=TrainingOptions(max_masks=16, steps=30, seed=0), log=records.append)
    path = train_generator("proxy-prompt", cases, random_sam2, [f for pair in files for f in pair],
                           output=tmp_path_factory.mktemp("ppg") / "ppg.pt", job=job)
    return path, records


@pytest.fixture(scope="module")
def small_cases(acdc, tmp_path_factory):
    """4-slice crops of ACDC ED patients as NRRD: training (001, 002) and unseen (011 reference, 019 target)."""
    from proxyprompt.volume import read_image, read_label, write_image

    folder = tmp_path_factory.mktemp("pp_small")
    for patient in ("patient001", "patient002", "patient011", "patient019"):
        image = read_image(acdc / f"{patient}_ED_image.nii.gz")
        label, _ = read_label(acdc / f"{patient}_ED_label.nii.gz")
        first = max(0, image.array.shape[0] // 2 - 2)
        write_image(crop_slices(image, first, 4), folder / f"{patient}.nrrd")
        write_image(crop_slices(label, first, 4), folder / f"{patient}_label.nrrd")
    return folder


# ---------------------------------------------------------------- modules
def test_network_shapes_and_gradients():
    from proxyprompt.generators.proxy_prompt_net import NetConfig, ProxyPromptNet

    torch.manual_seed(0)
    config = NetConfig(dim=32, heads=4, tokens_per_reference=5, prompt_tokens=3, mamba_state=8)
    net = ProxyPromptNet(config)
    target = torch.randn(256, 16, 16)
    references = torch.randn(2, 256, 16, 16)
    foreground = torch.zeros(2, 16, 16)
    foreground[0, 4:9, 5:10] = 1.0
    foreground[1, 7, 7] = 0.3  # thinner than a cell: only a fraction
    background = torch.zeros(2, 16, 16)
    background[:, 0:3] = 1.0
    sparse, dense = net(target, references, foreground, background)
    assert sparse.shape == (3, 256) and dense.shape == (256, 16, 16)
    maps, tokens, kinds, relevance = net.selective_maps(target, references, foreground, background)
    assert maps.shape == (4, 16, 16)
    # per reference: fg and bg prototypes + at most tokens_per_reference foreground cells (5 of 25; 1 of 1)
    assert tokens.shape == (2 + 5 + 2 + 1, 256) and kinds.tolist() == [0, 1] + [2] * 5 + [0, 1, 2]
    assert relevance.shape == (10,)
    (sparse.square().mean() + dense.square().mean()).backward()
    assert all(p.grad is not None for p in net.mamba.parameters() if p.requires_grad)
    no_dense = ProxyPromptNet(NetConfig(dim=32, dense=False))
    assert no_dense(target, references, foreground, background)[1] is None
    assert NetConfig.from_tensors(config.to_tensors()) == config



def test_prior_map_is_read_only_by_a_net_built_for_it():
    """`NetConfig.prior_map`: the structure's registration prior is a fifth target map; a net without it (every
    checkpoint written before it) has the old input widths and ignores a prior."""
    from proxyprompt.generators.proxy_prompt_net import MAPS, NetConfig, ProxyPromptNet

    torch.manual_seed(0)
    target, references = torch.randn(256, 16, 16), torch.randn(2, 256, 16, 16)
    foreground, background = torch.zeros(2, 16, 16), torch.zeros(2, 16, 16)
    foreground[:, 4:9, 5:10] = 1.0
    background[:, 0:3] = 1.0
    here, there = torch.zeros(16, 16), torch.zeros(16, 16)
    here[4:9, 5:10], there[10:14, 10:14] = 1.0, 1.0
    reading = ProxyPromptNet(NetConfig(dim=32, prior_map=True)).eval()
    assert reading.target_in[0].in_channels == 256 + MAPS + 1
    with torch.no_grad():
        first = reading(target, references, foreground, background, here)
        second = reading(target, references, foreground, background, there)
    assert not torch.allclose(first[0], second[0]) and not torch.allclose(first[1], second[1])
    plain = ProxyPromptNet(NetConfig(dim=32)).eval()
    assert plain.target_in[0].in_channels == 256 + MAPS
    with torch.no_grad():
        assert torch.equal(plain(target, references, foreground, background, here)[1],
                           plain(target, references, foreground, background, there)[1])
    tensors = NetConfig(prior_map=True).to_tensors()
    assert NetConfig.from_tensors(tensors).prior_map is True
    del tensors["config.prior_map"]  # a checkpoint from before the prior map
    assert NetConfig.from_tensors(tensors).prior_map is False


def test_training_registers_only_the_chosen_masks_of_the_other_cases(acdc):
    """The prior a network is trained with comes from the other cases' chosen slices only (a sparse reference), so
    training reads `max_masks` masks in all."""
    from proxyprompt.cases import load_reference_case
    from proxyprompt.frames import make_slice_stack
    from proxyprompt.generators.proxy_prompt import chosen_slices_only

    image, label = _files(acdc, ("patient001",))[0]
    case = load_reference_case(image, label)
    stack = make_slice_stack(case.image)
    labels = stack.labels(case.label)
    holding = [n for n in range(labels.shape[0]) if labels[n].any()]
    keep = [holding[1], holding[-2]]
    sparse = chosen_slices_only(case, stack, keep)
    assert sparse.annotated_slices == tuple(sorted(keep))
    masked = stack.labels(sparse.label)
    assert [n for n in range(masked.shape[0]) if masked[n].any()] == sorted(keep)
    np.testing.assert_array_equal(masked[keep], labels[keep])

def test_vision_mamba_block_is_bidirectional():
    from proxyprompt.generators.mamba import VisionMambaBlock

    torch.manual_seed(0)
    block = VisionMambaBlock(16, state=4)
    tokens = torch.randn(1, 12, 16)
    out = block(tokens)
    assert out.shape == tokens.shape
    changed = tokens.clone()
    changed[0, -1] += torch.randn(16)  # the last token reaches the first through the backward branch
    assert not torch.allclose(block(changed)[0, 0], out[0, 0])


@pytest.mark.parametrize("length", [1, 7, 8, 21])
def test_selective_scan_matches_the_step_by_step_loop(length):
    from proxyprompt.generators.mamba import selective_scan, selective_scan_chunked, selective_scan_loop

    torch.manual_seed(length)
    b, d, n = 2, 6, 4
    u = torch.randn(b, d, length, requires_grad=True)
    delta = torch.randn(b, d, length)
    A = -torch.rand(d, n) * 3
    B, C = torch.randn(b, n, length), torch.randn(b, n, length)
    D, z, bias = torch.randn(d), torch.randn(b, d, length), torch.randn(d)
    expected = selective_scan_loop(u, delta, A, B, C, D, z, bias, True)
    for chunk in (1, 3, 8):
        got = selective_scan_chunked(u, delta, A, B, C, D, z, bias, True, chunk=chunk)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, D, z, bias, True), expected, rtol=1e-4, atol=1e-5)
    plain = selective_scan_chunked(u, delta.abs(), A, B, C)  # no D, no gate, no bias
    torch.testing.assert_close(plain, selective_scan_loop(u, delta.abs(), A, B, C), rtol=1e-4, atol=1e-5)
    grad_loop = torch.autograd.grad(expected.sum(), u)[0]
    grad_chunked = torch.autograd.grad(selective_scan_chunked(u, delta, A, B, C, D, z, bias, True).sum(), u)[0]
    torch.testing.assert_close(grad_chunked, grad_loop, rtol=1e-4, atol=1e-5)


def test_selective_scan_matches_mamba_ssm_on_cuda():
    from proxyprompt.generators.mamba import _mamba_ssm_scan, selective_scan_chunked

    kernel = _mamba_ssm_scan()
    if not torch.cuda.is_available() or kernel is None:
        pytest.skip("needs a CUDA GPU with mamba-ssm installed (compares the PyTorch scan with its kernel)")
    torch.manual_seed(0)
    b, d, n, length = 2, 16, 8, 40
    u, delta = torch.randn(b, d, length, device="cuda"), torch.randn(b, d, length, device="cuda")
    A = -torch.rand(d, n, device="cuda")
    B, C = torch.randn(b, n, length, device="cuda"), torch.randn(b, n, length, device="cuda")
    D, z, bias = torch.randn(d, device="cuda"), torch.randn(b, d, length, device="cuda"), torch.randn(d, device="cuda")
    torch.testing.assert_close(selective_scan_chunked(u, delta, A, B, C, D, z, bias, True),
                               kernel(u, delta, A, B, C, D, z, bias, True), rtol=1e-3, atol=1e-3)


def test_training_slices_are_shared_out_evenly():
    from proxyprompt.generators.proxy_prompt import choose_training_slices

    stacks = [np.zeros((10, 4, 4), np.uint8), np.zeros((8, 4, 4), np.uint8), np.zeros((3, 4, 4), np.uint8)]
    stacks[0][1:9, 1, 1] = 1  # 8 annotated slices
    stacks[1][0:8, 2, 2] = 2  # 8
    stacks[2][1, 0, 0] = 1  # 1
    chosen = choose_training_slices(stacks, 16)
    assert len(chosen) == 16 and len(set(chosen)) == 16
    assert sum(c == 2 for c, _ in chosen) == 1 and sum(c == 0 for c, _ in chosen) == 8
    assert all(stacks[c][i].any() for c, i in chosen)
    assert len(choose_training_slices(stacks, 5)) == 5


# ---------------------------------------------------------------- training and checkpoints
def test_thirty_steps_on_sixteen_real_slices_lower_the_loss(trained):
    path, records = trained
    assert [r["step"] for r in records] == list(range(1, 31))
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses


def test_checkpoint_round_trip_and_refusal_of_another_model(trained, random_sam2):
    from proxyprompt.errors import InputError
    from proxyprompt.generators.checkpoints import load_generator_checkpoint
    from proxyprompt.generators.proxy_prompt import ProxyPromptGenerator

    path, _ = trained
    meta, tensors = load_generator_checkpoint(path, "proxy-prompt", random_sam2)
    assert meta.model == "random" and meta.image_size == 512 and meta.num_masks == 16
    assert meta.label_names == {1: "right ventricle", 2: "myocardium", 3: "left ventricle"}
    assert len(meta.training_data_sha256) == 64
    assert int(tensors["training.step"]) == 30
    assert int(tensors["config.prior_map"]) == 1  # the default: the network reads the registration prior
    net = ProxyPromptGenerator._net_from_tensors(tensors)
    for name, value in net.state_dict().items():
        assert torch.equal(value, tensors[f"net.{name}"])

    class Other:
        name, image_size = "litemedsam", 256

    with pytest.raises(InputError, match="trained for model 'random' at 512 px.*'litemedsam' at 256 px"):
        load_generator_checkpoint(path, "proxy-prompt", Other())


def test_inference_with_a_reference_it_never_saw(trained, small_cases):
    from proxyprompt.cases import load_reference_case
    from proxyprompt.pipeline import Engine
    from proxyprompt.volume import read_image

    path, _ = trained
    engine = Engine("random", image_size=512, device="cpu", precision="fp32")
    reference = load_reference_case(small_cases / "patient011.nrrd", small_cases / "patient011_label.nrrd")
    target = read_image(small_cases / "patient019.nrrd")
    result = engine.segment([reference], target, generator="proxy-prompt", options={"generator_checkpoint": str(path)})
    assert result.label.same_grid(target) and result.info["generator"] == "proxy-prompt"
    assert any("proxy-prompt: weights" in note for note in result.info["notes"])
    assert any("reads each structure's registration prior" in note for note in result.info["notes"])
    calls = result.info["encoder_calls"]
    again = engine.segment([reference], target, generator="proxy-prompt",
                           options={"generator_checkpoint": str(path)})
    assert again.info["encoder_calls"] == calls  # target and reference features are both reused
    np.testing.assert_array_equal(again.label.array, result.label.array)


def test_conditioning_frames_for_sam2(trained, small_cases, random_sam2):
    from proxyprompt.cases import load_reference_case
    from proxyprompt.frames import make_slice_stack
    from proxyprompt.generators.base import GeneratorContext, get_generator
    from proxyprompt.volume import read_image

    path, _ = trained
    reference = load_reference_case(small_cases / "patient011.nrrd", small_cases / "patient011_label.nrrd")
    target = read_image(small_cases / "patient019.nrrd")
    frames = make_slice_stack(target)
    random_sam2.features(frames)
    context = GeneratorContext([reference], target, frames, [1, 2, 3], random_sam2,
                               options={"generator_checkpoint": str(path), "conditioning_frames": 2})
    plan = get_generator("proxy-prompt").plan(context)
    for value in (1, 2, 3):
        embeddings = plan.objects[value].embeddings
        assert len(embeddings) == 2
        for embedding in embeddings.values():
            assert embedding.sparse_tokens_t256.shape == (4, 256)
            assert embedding.dense_256hw.shape == (256, 32, 32)


def test_sam_v1_random_trains_and_segments_per_slice(small_cases):
    from proxyprompt.cases import load_reference_case
    from proxyprompt.frames import make_slice_stack
    from proxyprompt.generators.base import GeneratorContext, get_generator
    from proxyprompt.generators.checkpoints import TrainingJob, train_generator
    from proxyprompt.generators.propagation import execute_plan
    from proxyprompt.models.registry import get_model_spec
    from proxyprompt.models.sam_family import SamFamilyModel
    from proxyprompt.options import TrainingOptions
    from proxyprompt.volume import read_image

    model = SamFamilyModel(get_model_spec("sam_vit_b"), device="cpu", image_size=256, random_weights=True,
                           precision="fp32")
    files = [(small_cases / "patient001.nrrd", small_cases / "patient001_label.nrrd"),
             (small_cases / "patient002.nrrd", small_cases / "patient002_label.nrrd")]
    cases = [load_reference_case(*pair) for pair in files]
    records = []
    path = train_generator("proxy-prompt", cases, model, [f for pair in files for f in pair],
                           output=small_cases / "sam_v1.pt",
                           job=TrainingJob(options=TrainingOptions(max_masks=4, steps=2), log=records.append))
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    reference = load_reference_case(small_cases / "patient011.nrrd", small_cases / "patient011_label.nrrd")
    target = read_image(small_cases / "patient019.nrrd")
    frames = make_slice_stack(target)
    model.features(frames)
    plan = get_generator("proxy-prompt").plan(GeneratorContext(
        [reference], target, frames, [1, 3], model, options={"generator_checkpoint": str(path)}))
    assert sorted(plan.objects[1].embeddings) == list(range(frames.num_slices))  # every slice, no memory
    probabilities = execute_plan(model, frames, plan)
    assert probabilities[1].shape == frames.images.shape
    assert np.all((probabilities[3] >= 0) & (probabilities[3] <= 1))


def test_random_sam_v1_is_a_registered_model_with_the_same_weights_in_every_build():
    """`--model random_sam_vit_b`: SAM ViT-B (segment-anything) with random weights from a fixed seed, so a generator
    trained by `proxyprompt train` meets the same frozen decoder in `proxyprompt segment` (another process)."""
    from proxyprompt.errors import InputError
    from proxyprompt.models.loader import load_model
    from proxyprompt.models.registry import get_model_spec, list_models

    assert get_model_spec("random-sam").name == "random_sam_vit_b"
    row = {r["name"]: r for r in list_models()}["random_sam_vit_b"]
    assert row["family"] == "sam" and row["cached"] and row["path"] is None  # no file to download
    first, second = (load_model("random-sam", image_size=256, device="cpu") for _ in range(2))
    assert first.is_random and first.image_size == 256 and first.capabilities.feature_grid == (16, 16)
    for (name, a), (_, b) in zip(first.net.mask_decoder.state_dict().items(),
                                 second.net.mask_decoder.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.net.image_encoder.patch_embed.proj.weight,
                           torch.zeros_like(first.net.image_encoder.patch_embed.proj.weight))
    with pytest.raises(InputError, match="random weights"):
        load_model("random-sam", checkpoint="sam_vit_b_01ec64.pth", image_size=256, device="cpu")


# ---------------------------------------------------------------- CLI, end to end
def _train_args(folder, model, output, extra=()):
    return ["train", "--generator", "proxy-prompt", "--model", model,
            "--image", str(folder / "patient001.nrrd"), "--label", str(folder / "patient001_label.nrrd"),
            "--image", str(folder / "patient002.nrrd"), "--label", str(folder / "patient002_label.nrrd"),
            "--max-masks", "4", "--output", str(output), "--quiet", "--json", *extra]


def _segment_args(folder, model, checkpoint, output):
    return ["segment", "--reference-image", str(folder / "patient011.nrrd"),
            "--reference-label", str(folder / "patient011_label.nrrd"), "--target", str(folder / "patient019.nrrd"),
            "--output", str(output), "--model", model, "--generator", "proxy-prompt",
            "--generator-checkpoint", str(checkpoint), "--quiet", "--json"]


@pytest.mark.parametrize("model, size, resume", [("random", ["--image-size", "512"], True),
                                                 ("random_sam_vit_b", ["--image-size", "256"], False),
                                                 ("litemedsam", [], False)])
def test_cli_train_then_segment(small_cases, tmp_path, capsys, model, size, resume):
    from proxyprompt.cli import main
    from proxyprompt.volume import read_image, read_label

    checkpoint, log = tmp_path / "ppg.pt", tmp_path / "loss.jsonl"
    assert main(_train_args(small_cases, model, checkpoint, ["--steps", "2", "--log", str(log), *size])) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == model and summary["steps"] == 2 and summary["num_masks"] == 4
    assert summary["precision"] == "fp32"  # bf16 only on CUDA
    if resume:
        resumed = tmp_path / "ppg_resumed.pt"
        assert main(_train_args(small_cases, model, resumed, ["--steps", "3", "--log", str(log), "--resume",
                                                              str(checkpoint), *size])) == 0
        capsys.readouterr()
        checkpoint = resumed
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == ([1, 2, 3] if resume else [1, 2]) and all("loss" in r for r in records)

    output = tmp_path / "out.nii.gz"
    assert main(_segment_args(small_cases, model, checkpoint, output) + size) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["generator"] == "proxy-prompt" and result["model"] == model
    assert result["random_weights"] == model.startswith("random")
    label, _ = read_label(output)
    assert label.same_grid(read_image(small_cases / "patient019.nrrd"))


def test_cli_train_refusals(small_cases, trained, tmp_path, capsys):
    from proxyprompt.cli import main

    path, _ = trained
    output = tmp_path / "x.pt"
    assert main(_train_args(small_cases, "litemedsam", output, ["--generator", "registration"])) == 2
    assert "cannot be trained" in capsys.readouterr().err
    assert main(_train_args(small_cases, "litemedsam", output, ["--resume", str(path)])) == 2
    assert "was trained for model 'random' at 512 px" in capsys.readouterr().err and not output.exists()
    assert main(_train_args(small_cases, "litemedsam", output, ["--resume", str(tmp_path / "missing.pt")])) == 2
    assert "not found" in capsys.readouterr().err and not output.exists()
