"""Channel pruning of diffusers UNets: shapes, ratios, heads, GEGLU, save/rebuild, bad input."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from toolchain.models.io import ModelError, load_unet, save_unet
from toolchain.pruning import prune_unet_channels

TINY_CONFIG = Path(__file__).parents[1] / "assets" / "tiny-sd" / "unet" / "config.json"
# Expected share of parameters kept. Below (1 - r)^2 because heads are removed with ceil and
# GroupNorm keeps channels in whole steps of num_groups: at these widths (4-8 channels per
# group) a step is 12-25% of a layer, so 0.3 rounds to ~0.4 kept on small models.
PARAM_SHARE = {0.5: (0.20, 0.35), 0.3: (0.35, 0.60)}


def build_unet(kind: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    if kind == "tiny":
        return UNet2DConditionModel.from_config(json.loads(TINY_CONFIG.read_text())).eval()
    # SD-1.x layout at small width: three cross-attention levels, layers_per_block 2.
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=64,
        norm_num_groups=8,
    ).eval()


def fixed_inputs(unet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    encoder_hidden_states = torch.randn(2, 5, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([3, 700]), encoder_hidden_states


@torch.no_grad()
def run(unet) -> torch.Tensor:
    return unet(*fixed_inputs(unet)).sample


def describe(unet) -> dict:
    """What the tests compare after pruning, taken from the unpruned UNet."""
    return {
        "params": sum(p.numel() for p in unet.parameters()),
        "output_shape": run(unet).shape,
        "conv_out": unet.conv_out.weight.detach().clone(),
        "time_in": unet.time_embedding.linear_1.in_features,
        "head_dim": {n: m.inner_dim // m.heads for n, m in unet.named_modules() if isinstance(m, Attention)},
        "geglu_bias": {n: m.bias.detach().clone() for n, m in unet.named_modules() if n.endswith("ff.net.0.proj")},
    }


@pytest.fixture(scope="module", params=[("tiny", 0.5), ("tiny", 0.3), ("sd1x", 0.5), ("sd1x", 0.3)], ids=str)
def pruned(request):
    kind, ratio = request.param
    unet = build_unet(kind)
    before = describe(unet)
    record = prune_unet_channels(unet, ratio)
    return ratio, before, unet, record


def test_output_shape_and_interfaces_unchanged(pruned):
    _, before, unet, record = pruned
    assert run(unet).shape == before["output_shape"]
    assert unet.conv_in.in_channels == 4
    assert unet.conv_out.out_channels == 4
    assert unet.time_embedding.linear_1.in_features == before["time_in"]
    json.dumps(record)  # the record is plain JSON


def test_params_fall_by_requested_share(pruned):
    ratio, before, unet, record = pruned
    after = sum(p.numel() for p in unet.parameters())
    assert (record["params_before"], record["params_after"]) == (before["params"], after)
    low, high = PARAM_SHARE[ratio]
    assert low <= after / before["params"] <= high


def test_attention_keeps_head_dim(pruned):
    _, before, unet, record = pruned
    attentions = {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}
    assert set(attentions) == set(record["attention_heads"])
    for name, attn in attentions.items():
        head_dim = before["head_dim"][name]
        assert attn.heads == record["attention_heads"][name]
        assert attn.to_q.out_features == attn.to_k.out_features == attn.heads * head_dim
        assert attn.to_out[0].in_features == attn.heads * head_dim


def test_groupnorm_divisible(pruned):
    _, _, unet, _ = pruned
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)


def test_geglu_keeps_its_share_and_both_halves_match(pruned):
    ratio, before, unet, _ = pruned
    for name, proj in unet.named_modules():
        if name not in before["geglu_bias"]:
            continue
        old_bias = before["geglu_bias"][name]
        inner = old_bias.numel() // 2
        kept = proj.out_features // 2
        assert proj.out_features % 2 == 0 and unet.get_submodule(name[: -len("0.proj")] + "2").in_features == kept
        assert abs(kept / inner - (1 - ratio)) < 0.05
        # Random init gives every bias entry a distinct value: locate each kept row.
        rows = [int((old_bias == b).nonzero()) for b in proj.bias.detach()]
        assert rows[:kept] == [r - inner for r in rows[kept:]]


# fp32 summation order only: rebuilt weights are read from safetensors into memory of another
# alignment, and CPU kernels may then sum in another order (measured on an AMD EPYC: 6e-7 at an
# output scale of 0.7; bit-identical on an Intel Xeon). One conv's channels out of order moves it by 0.45.
REBUILD_TOLERANCE = 1e-5


def test_save_and_rebuild_is_exact(pruned, tmp_path):
    """The weights come back bit for bit (a copy, portable); the outputs agree within fp32 rounding."""
    _, _, unet, record = pruned
    save_unet(unet, tmp_path, record)
    rebuilt = load_unet(tmp_path)
    saved, loaded = unet.state_dict(), rebuilt.state_dict()
    assert list(loaded) == list(saved)
    for key, tensor in saved.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    torch.testing.assert_close(run(rebuilt), run(unet), rtol=0.0, atol=REBUILD_TOLERANCE)


def test_tampered_record_is_refused_naming_the_key(tmp_path):
    unet = build_unet("tiny")
    record = prune_unet_channels(unet, 0.5)
    key = "down_blocks.0.resnets.0.conv1.weight"
    bad_shape = json.loads(json.dumps(record))
    bad_shape["shapes"][key][0] += 8
    save_unet(unet, tmp_path / "shape", bad_shape)
    with pytest.raises(ModelError, match=key.replace(".", r"\.")):
        load_unet(tmp_path / "shape")
    bad_heads = json.loads(json.dumps(record))
    bad_heads["attention_heads"]["mid_block.attentions.0.transformer_blocks.0.attn1"] = 3
    save_unet(unet, tmp_path / "heads", bad_heads)
    with pytest.raises(ModelError, match="mid_block.attentions.0.transformer_blocks.0.attn1"):
        load_unet(tmp_path / "heads")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": 0.5, "importance": "taylorish"}, "magnitude"),
        ({"ratio": 0.5, "round_to": 8}, "round_to"),
    ],
)
def test_bad_arguments_refused_before_pruning(kwargs, message):
    unet = build_unet("tiny")
    params = sum(p.numel() for p in unet.parameters())
    with pytest.raises(ValueError, match=message):
        prune_unet_channels(unet, **kwargs)
    assert sum(p.numel() for p in unet.parameters()) == params


def test_import_does_not_load_torch_pruning():
    code = "import sys, toolchain, toolchain.pruning; assert 'torch_pruning' not in sys.modules"
    root = Path(__file__).parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})


def test_one_channel_groups_run_at_batch_one(tmp_path):
    """Pruning can leave a GroupNorm one channel per group; at the 1x1 innermost level a batch-1
    input (a k-step generator, unguided) then has one value per group, which F.group_norm refuses.
    The pruned UNet runs it, before and after save/rebuild, and each image equals its batch-2 row."""
    from toolchain.models.io import EMBEDDED_MODEL
    from toolchain.models.rebuild import OneChannelGroupNorm

    unet = UNet2DConditionModel.from_pretrained(EMBEDDED_MODEL / "unet").eval()  # 32 groups, 1x1 innermost
    record = prune_unet_channels(unet, 0.3)  # the default recipe's pruning
    assert any(isinstance(m, OneChannelGroupNorm) for m in unet.modules())
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    states = torch.randn(2, 5, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([3, 700])
    save_unet(unet, tmp_path / "unet", record)
    for model in (unet, load_unet(tmp_path / "unet")):
        with torch.no_grad():
            both = model(sample, timesteps, states).sample
            for i in range(2):
                alone = model(sample[i : i + 1], timesteps[i : i + 1], states[i : i + 1]).sample
                torch.testing.assert_close(alone, both[i : i + 1], atol=1e-5, rtol=1e-4)
