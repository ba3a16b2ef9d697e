"""The pruning suite: Taylor importance and per-block ratios, BK-SDM block removal, ConceptPrune,
the prune / concept_prune stages and their configs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from toolchain.artifact import Artifact
from toolchain.config import ConceptPruneConfig, ConceptPruneSettings, ConfigError, PruneConfig, from_dict
from toolchain.models.architectures import MODEL_CONFIG_DIR, build_unet_from_config
from toolchain.models.io import load_pipeline, load_unet
from toolchain.pruning import (
    accumulate_taylor_gradients,
    concept_prune,
    prune_unet_channels,
    remove_unet_blocks,
    student_config,
)

TINY_CONFIG = Path(__file__).parents[1] / "assets" / "tiny-sd" / "unet" / "config.json"
DIGITS_MODEL = Path(__file__).resolve().parents[2] / "toolchain" / "assets" / "digits-sd"


def sd1x_unet(block_out_channels=(32, 64, 64, 64), layers_per_block=2) -> UNet2DConditionModel:
    """SD-1.x block layout at small width (CrossAttnDown x3 + Down, mid, Up + CrossAttnUp x3)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=layers_per_block,
        attention_head_dim=8,
        cross_attention_dim=64,
        norm_num_groups=8,
    ).eval()


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(json.loads(TINY_CONFIG.read_text())).eval()


def inputs_for(unet, batch=2, side=8, seq=5):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, unet.config.in_channels, side, side, generator=generator)
    states = torch.randn(batch, seq, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([3, 700][:batch]), states


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def forward(unet, *args):
    return unet(*args).sample


# ---------------------------------------------------------------------------------------------
# Channels: Taylor importance, per-block ratios


def test_taylor_importance_prunes_and_clears_gradients():
    unet = sd1x_unet()
    before = params(unet)
    condition = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))
    record = prune_unet_channels(
        unet, 0.5, importance="taylor", taylor={"encoder_hidden_states": condition, "steps": 3, "stop": 0.0, "batch": 2}
    )
    assert record["importance"] == "taylor"
    assert record["taylor"]["timesteps"] == [0, 500, 999]  # low to high noise, none skipped at stop 0
    assert not record["taylor"]["stopped_early"]
    assert record["params_after"] < 0.4 * before
    assert forward(unet, *inputs_for(unet)).shape == (2, 4, 8, 8)
    assert all(p.grad is None for p in unet.parameters())
    json.dumps(record)


def test_taylor_ranks_by_gradients_not_magnitude():
    """Same widths as magnitude pruning, different channels kept."""
    kept = {}
    for importance in ("magnitude", "taylor"):
        unet = sd1x_unet()
        condition = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))
        taylor = {"encoder_hidden_states": condition, "steps": 2, "batch": 2} if importance == "taylor" else None
        prune_unet_channels(unet, 0.5, importance=importance, taylor=taylor)
        kept[importance] = unet.state_dict()
    assert {k: v.shape for k, v in kept["magnitude"].items()} == {k: v.shape for k, v in kept["taylor"].items()}
    assert not torch.equal(kept["magnitude"]["conv_in.weight"], kept["taylor"]["conv_in.weight"])


def test_taylor_early_stop_uses_fewer_timesteps():
    """Diff-Pruning's rule: stop after the first step whose loss is below `stop` x the largest loss
    so far. A random UNet's loss barely moves, so the threshold is set just above the lowest
    loss/max ratio of a full run, and the stop must land where that run says."""
    unet = tiny_unet()
    condition = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(2))
    full = accumulate_taylor_gradients(unet, condition, steps=10, stop=0.0, batch=2)
    assert len(full["timesteps"]) == 10 and not full["stopped_early"]
    assert full["timesteps"] == sorted(full["timesteps"])  # low to high noise
    losses = full["losses"]
    ratios = [loss / max(losses[: i + 1]) for i, loss in enumerate(losses)]
    stop = min(ratios[1:]) + 1e-6
    assert stop < 1, "the loss never fell below its running maximum; pick another seed"
    expected = next(i for i, r in enumerate(ratios) if r < stop) + 1
    unet.zero_grad(set_to_none=True)
    early = accumulate_taylor_gradients(unet, condition, steps=10, stop=stop, batch=2)
    assert len(early["timesteps"]) == expected < 10 and early["stopped_early"]
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_taylor_without_condition_is_refused():
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        prune_unet_channels(tiny_unet(), 0.5, importance="taylor")


def test_block_ratios_are_honoured():
    unet = sd1x_unet()
    reference = {n: m.conv1.out_channels for n, m in unet.named_modules() if n.endswith("resnets.0")}
    heads = {n: m.heads for n, m in unet.named_modules() if isinstance(m, Attention)}
    record = prune_unet_channels(unet, 0.5, block_ratios={"down_blocks.1": 0.0, "up_blocks.2": 0.0})
    assert record["block_ratios"] == {"down_blocks.1": 0.0, "up_blocks.2": 0.0}
    for name, module in unet.named_modules():
        kept = name.startswith(("down_blocks.1.", "up_blocks.2."))
        if name in reference:  # a resnet's inner width is a group of its own block
            expected = reference[name] if kept else reference[name] // 2
            assert module.conv1.out_channels == expected, name
        if isinstance(module, Attention):
            assert (module.heads == heads[name]) == kept, name
    assert forward(unet, *inputs_for(unet)).shape == (2, 4, 8, 8)


def test_block_ratios_refuse_unknown_modules_and_bad_ratios():
    with pytest.raises(ValueError, match="down_blocks.9"):
        prune_unet_channels(sd1x_unet(), 0.5, block_ratios={"down_blocks.9": 0.1})
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        prune_unet_channels(sd1x_unet(), 0.5, block_ratios={"mid_block": 1.0})


def test_real_shaped_sd15_layout_prunes():
    """SD-1.5's config with block widths / 10 (heads of 8 channels as in SD-1.5's 40-160)."""
    config = json.loads((MODEL_CONFIG_DIR / "sd15-unet.json").read_text())
    config.update(block_out_channels=[32, 64, 128, 128], sample_size=8)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval()
    args = inputs_for(unet, seq=77)
    record = prune_unet_channels(unet, 0.5)
    assert forward(unet, *args).shape == (2, 4, 8, 8)
    assert 0.2 < record["params_after"] / record["params_before"] < 0.35


@pytest.mark.slow
def test_sd15_channel_pruning():
    unet = build_unet_from_config("sd15")
    record = prune_unet_channels(unet, 0.3)
    assert record["params_before"] == 859_520_964
    assert 0.40 < record["params_after"] / record["params_before"] < 0.55  # ~(1 - 0.3)^2
    sample = torch.randn(1, 4, 16, 16)
    assert forward(unet, sample, torch.tensor([10]), torch.randn(1, 77, 768)).shape == (1, 4, 16, 16)


# ---------------------------------------------------------------------------------------------
# BK-SDM block removal

TEACHER = sd1x_unet()
PRESET_LAYOUT = {  # preset -> (stages, resnets per down / up stage, mid block)
    "bk-base": (4, 1, 2, True),
    "bk-small": (4, 1, 2, False),
    "bk-tiny": (3, 1, 2, False),
}


@pytest.fixture(scope="module", params=list(PRESET_LAYOUT))
def bk_student(request):
    student, record = remove_unet_blocks(TEACHER, request.param)
    return request.param, student, record


def test_bk_output_shape_and_layout(bk_student):
    preset, student, record = bk_student
    stages, down_pairs, up_pairs, has_mid = PRESET_LAYOUT[preset]
    args = inputs_for(TEACHER)
    assert forward(student, *args).shape == forward(TEACHER, *args).shape
    assert len(student.down_blocks) == len(student.up_blocks) == stages
    assert all(len(block.resnets) == down_pairs for block in student.down_blocks)
    assert all(len(block.resnets) == up_pairs for block in student.up_blocks)
    assert (student.mid_block is not None) == has_mid
    assert record["method"] == preset
    json.dumps(record)


def test_bk_params_fall_by_the_removed_modules(bk_student):
    """The student is the teacher minus exactly the modules no student tensor comes from."""
    _, student, record = bk_student
    teacher_state = TEACHER.state_dict()
    removed = sum(t.numel() for k, t in teacher_state.items() if any(k.startswith(p) for p in record["removed"]))
    assert record["params_before"] == params(TEACHER)
    assert record["params_after"] == params(student) == params(TEACHER) - removed


def test_bk_student_is_a_stock_config_with_the_teachers_weights(bk_student):
    _, student, record = bk_student
    stock = UNet2DConditionModel.from_config(student.config)
    stock.load_state_dict(student.state_dict(), strict=True)
    teacher_state = TEACHER.state_dict()
    for key, tensor in student.state_dict().items():
        prefix = next(p for p in record["mapping"] if key.startswith(p))
        assert torch.equal(tensor, teacher_state[record["mapping"][prefix] + key[len(prefix) :]]), key
    # the kept entry path computes what the teacher's does
    sample, timestep, states = inputs_for(TEACHER)
    with torch.no_grad():
        assert torch.equal(student.conv_in(sample), TEACHER.conv_in(sample))
        emb = TEACHER.time_embedding(TEACHER.time_proj(timestep))
        assert torch.equal(student.time_embedding(student.time_proj(timestep)), emb)
        h = TEACHER.conv_in(sample)
        assert torch.equal(student.down_blocks[0].resnets[0](h, emb), TEACHER.down_blocks[0].resnets[0](h, emb))


def test_bk_tiny_up_stages_come_from_the_next_teacher_stage():
    _, record = remove_unet_blocks(TEACHER, "bk-tiny")
    assert record["mapping"]["up_blocks.0.resnets.1."] == "up_blocks.1.resnets.2."
    assert record["mapping"]["up_blocks.2.attentions.0."] == "up_blocks.3.attentions.0."
    assert "down_blocks.3.resnets.0." in record["removed"] and "mid_block.resnets.0." in record["removed"]


def test_bk_student_round_trips_through_save_pretrained(tmp_path):
    student, _ = remove_unet_blocks(TEACHER, "bk-small")
    student.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["mid_block_type"] is None
    loaded = load_unet(tmp_path)
    saved = student.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(tensor, saved[key]) for key, tensor in loaded.state_dict().items())
    # outputs: fp32 rounding only. Weights read from safetensors sit at another memory alignment,
    # where CPU kernels may sum in another order (tests/pruning/test_pruning_channels.py, REBUILD_TOLERANCE)
    args = inputs_for(TEACHER)
    torch.testing.assert_close(forward(loaded, *args), forward(student, *args), rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("preset", ["bk-base", "bk-tiny"])
def test_bk_refuses_unets_it_does_not_fit(preset):
    with pytest.raises(ValueError, match=f"{preset}.*down_block_types"):
        remove_unet_blocks(tiny_unet(), preset)
    with pytest.raises(ValueError, match=f"{preset}.*layers_per_block 2"):
        remove_unet_blocks(sd1x_unet(layers_per_block=1), preset)


def test_bk_sizes_on_sd15_and_sd21_base_match_the_paper():
    """BK-SDM: U-Net 0.86B -> Base 0.58B, Small 0.49B, Tiny 0.33B (counted on the meta device)."""
    expected = {
        "sd15": {"bk-base": 579_384_964, "bk-small": 482_346_884, "bk-tiny": 323_384_964},
        "sd21-base": {"bk-base": 583_480_964, "bk-small": 485_787_524, "bk-tiny": 326_825_604},
    }
    for name, sizes in expected.items():
        teacher = build_unet_from_config(name, device="meta")
        for preset, size in sizes.items():
            with torch.device("meta"):
                student = UNet2DConditionModel.from_config(student_config(teacher.config, preset))
            assert params(student) == size, (name, preset)


# ---------------------------------------------------------------------------------------------
# ConceptPrune


@pytest.fixture(scope="module")
def tiny_pipe_dir(tmp_path_factory):
    from toolchain.models.io import build_pipeline_from_configs

    return build_pipeline_from_configs(TINY_CONFIG.parents[1], tmp_path_factory.mktemp("cp") / "pipe", seed=0)


TARGETS = ["a handwritten digit seven", "the number 7"]


def test_concept_prune_zeroes_skilled_weights_only(tiny_pipe_dir):
    pipe = load_pipeline(tiny_pipe_dir)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    skill_ratio, timesteps = 0.05, 3
    record = concept_prune(pipe, TARGETS, ["a handwritten digit"], skill_ratio, timesteps, steps=6, seed=0)
    after = pipe.unet.state_dict()
    assert record["zeroed_total"] > 0
    for key in before:
        layer = key.removesuffix(".weight")
        if layer not in record["layers"]:
            assert torch.equal(before[key], after[key]), key  # everything else untouched
            continue
        weight, original = after[key], before[key]
        mask = torch.zeros(weight.numel(), dtype=torch.bool)
        mask[record["masks"][layer]] = True
        mask = mask.reshape(weight.shape)
        assert (weight[mask] == 0).all() and torch.equal(weight[~mask], original[~mask])
        k = max(1, int(skill_ratio * weight.shape[1]))
        per_row = mask.sum(1)
        assert per_row.max() <= k * timesteps  # the union of at most k per row per step
        assert record["layers"][layer]["zeroed"] == mask.sum()
    assert record["zeroed_total"] <= k * timesteps * sum(info["shape"][0] for info in record["layers"].values())
    json.dumps(record)


def test_concept_prune_one_step_keeps_at_most_k_per_row_and_nothing_for_identical_prompts(tiny_pipe_dir):
    pipe = load_pipeline(tiny_pipe_dir)
    record = concept_prune(pipe, TARGETS, ["a handwritten digit"], 0.05, timesteps=1, steps=4, seed=0)
    for layer, info in record["layers"].items():
        k = max(1, int(0.05 * info["shape"][1]))
        rows = torch.tensor(record["masks"][layer], dtype=torch.long) // info["shape"][1]
        assert torch.bincount(rows, minlength=info["shape"][0]).max() <= k
    same = concept_prune(load_pipeline(tiny_pipe_dir), TARGETS, TARGETS, 0.05, timesteps=2, steps=4, seed=0)
    assert same["zeroed_total"] == 0  # a target score never beats an identical base score


def test_concept_prune_after_channel_pruning(tiny_pipe_dir):
    pipe = load_pipeline(tiny_pipe_dir)
    prune_unet_channels(pipe.unet, 0.5)
    record = concept_prune(pipe, TARGETS, ["a handwritten digit"], 0.05, timesteps=2, steps=4, seed=0)
    widths = {n: list(m.weight.shape) for n, m in pipe.unet.named_modules() if n.endswith("ff.net.2")}
    assert {n: info["shape"] for n, info in record["layers"].items()} == widths
    assert record["zeroed_total"] > 0


def test_concept_prune_refuses_unpaired_prompts(tiny_pipe_dir):
    with pytest.raises(ValueError, match="base prompts"):
        concept_prune(load_pipeline(tiny_pipe_dir), TARGETS * 2, TARGETS[:2] + ["x"], 0.01, 1, 2, 0)


# ---------------------------------------------------------------------------------------------
# Stages and configs


def stage_context(out_dir: Path) -> SimpleNamespace:
    out_dir.mkdir(parents=True)
    return SimpleNamespace(out_dir=out_dir, progress=False)


def test_prune_stage_taylor_writes_a_rebuildable_unet(tiny_pipe_dir, tmp_path):
    from toolchain.stages import prune

    cfg = PruneConfig(ratio=0.5, importance="taylor", taylor_steps=3, taylor_batch=2)
    result = prune.run(Artifact(path=tiny_pipe_dir, kind="diffusers"), cfg, stage_context(tmp_path / "out"))
    summary = result.records["pruning"]
    assert summary["importance"] == "taylor" and len(summary["taylor"]["timesteps"]) <= 3
    unet = load_unet(result.path / "unet")
    assert params(unet) == summary["params_after"] < summary["params_before"]


def test_prune_stage_bk_on_a_two_level_unet_says_what_it_needs(tiny_pipe_dir, tmp_path):
    from toolchain.stages import prune

    with pytest.raises(ValueError, match="bk-small: needs an SD-1.x/2.x UNet layout"):
        prune.run(
            Artifact(path=tiny_pipe_dir, kind="diffusers"),
            PruneConfig(method="bk-small"),
            stage_context(tmp_path / "out"),
        )


def test_concept_prune_stage(tiny_pipe_dir, tmp_path):
    from safetensors.torch import load_file

    from toolchain.models.io import component_params
    from toolchain.stages import concept_prune as stage

    cfg = ConceptPruneConfig(enabled=True, skill_ratio=0.05, timesteps=2, steps=4)
    result = stage.run(
        Artifact(path=tiny_pipe_dir, kind="diffusers"),
        ConceptPruneSettings(cfg, ["7"]),
        stage_context(tmp_path / "out"),
    )
    masks = load_file(result.path / stage.MASKS_FILE)
    summary = json.loads((result.path / stage.SUMMARY_FILE).read_text())
    assert sum(int(m.sum()) for m in masks.values()) == summary["zeroed_total"] > 0
    assert summary["erase"] == ["7"] and summary["base_prompts"][0] == "a handwritten digit"
    unet = load_pipeline(result.path).unet.state_dict()
    for layer, mask in masks.items():
        assert (unet[f"{layer}.weight"][mask] == 0).all()
    assert component_params(result.path)["unet"] == component_params(tiny_pipe_dir)["unet"]


@pytest.mark.parametrize(
    "cls, data, message",
    [
        (PruneConfig, {"method": "bk-huge"}, "prune.method"),
        (PruneConfig, {"importance": "hessian"}, "prune.importance"),
        (PruneConfig, {"block_ratios": {"mid_block": 1.2}}, "prune.block_ratios.mid_block"),
        (PruneConfig, {"method": "bk-small", "block_ratios": {"mid_block": 0.2}}, "removes whole blocks"),
        (PruneConfig, {"taylor_stop": 1.0}, "prune.taylor_stop"),
        (PruneConfig, {"taylor_steps": 0}, "prune.taylor_steps"),
        (ConceptPruneConfig, {"skill_ratio": 0.0}, "concept_prune.skill_ratio"),
        (ConceptPruneConfig, {"timesteps": 60, "steps": 50}, "concept_prune.timesteps"),
    ],
)
def test_bad_config_values_name_the_key(cls, data, message):
    prefix = "prune" if cls is PruneConfig else "concept_prune"
    with pytest.raises(ConfigError, match=message):
        from_dict(cls, data, prefix)


def test_importance_choices_match_the_registry():
    import typing

    from toolchain.pruning import IMPORTANCES

    assert set(typing.get_args(typing.get_type_hints(PruneConfig)["importance"])) == set(IMPORTANCES)


# ---------------------------------------------------------------------------------------------
# ConceptPrune on the trained digits model


@pytest.mark.slow
def test_concept_prune_erases_digit_seven_on_the_digits_model():
    from benchmarks.leakage import evaluate_concepts, get_judge
    from toolchain.config import load_concept
    from toolchain.runtime.pytorch import diffusers_generator

    concept = load_concept("7")
    judge = get_judge(concept.judge)
    pipe = load_pipeline(DIGITS_MODEL)
    generate = diffusers_generator(pipe, steps=25, guidance_scale=5.0)
    erase, retain = {concept.label: concept.erase_prompts[:2]}, concept.retain_prompts
    before = evaluate_concepts(generate, judge, erase=erase, retain=retain, n_per_prompt=8, seed=0)
    # At the paper's 1-2% nothing changes on this small model (measured: 7 stays at 1.0); 30% of
    # each ff.net.2 row is where the digit starts to go (1.0 -> 0.89 with the others at 1.0).
    concept_prune(pipe, concept.erase_prompts, [concept.anchor_prompt], 0.3, 10, 25, 0, guidance_scale=5.0)
    after = evaluate_concepts(generate, judge, erase=erase, retain=retain, n_per_prompt=8, seed=0)
    print("leakage", before.leakage, "->", after.leakage, "retain", before.retain_accuracy, "->", after.retain_accuracy)
    assert after.leakage["7"] < before.leakage["7"]
    assert after.retain_accuracy > 0.8 * before.retain_accuracy
