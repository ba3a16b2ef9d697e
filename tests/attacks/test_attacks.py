"""White-box attacks on erasure (toolchain/attacks/) and the robust unlearning option.

Budgets and bad input on the tiny random model (tests/assets/tiny-sd); whether the attack finds
a naive erasure, stays at chance on a model that never learned the concept, and whether the
robust option resists it, on the embedded digits model with short runs.
"""

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from toolchain.config import AttackConfig, ConfigError, EsdConfig, FinetuneConfig, RobustConfig, load_config

NAIVE = dict(  # ESD on the one prompt "seven", cross-attention only: erases the phrase, not the digit
    mode="sequential",
    steps=31,
    unlearn_steps=30,
    samples_per_prompt=4,
    sample_steps=10,
    batch_size=8,
    upper_batch_size=8,
    trainable="cross_attention",
    checkpoint_every=1000,
    lower_lr=1e-12,
    upper_lr=1e-3,
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(digits pipeline, its teacher samples for ["seven"] and two retain prompts)."""
    from toolchain.finetune import prepare_data
    from toolchain.models.io import EMBEDDED_MODEL, load_pipeline

    pipe = load_pipeline(EMBEDDED_MODEL)
    cache = tmp_path_factory.mktemp("samples") / "s.safetensors"
    data = prepare_data(
        pipe, ["the number 1", "the number 3"], [("seven", "a handwritten digit")], FinetuneConfig(**NAIVE), cache
    )
    return pipe, data


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "bad",
    [
        dict(prefix_tokens=0),
        dict(prefix_tokens=-2),
        dict(steps=-1),
        dict(inversion_steps=-5),
        dict(n_prompts=0),
        dict(images_per_prompt=0),
        dict(inversion_lr=0.0),
        dict(candidates=0),
        dict(select_every=-1),
        dict(soft_steps=-1),
        dict(soft_lr=0.0),
    ],
)
def test_attack_config_refuses_bad_values(bad):
    with pytest.raises(ConfigError, match="attack\\."):
        AttackConfig(**bad)


def test_attack_section_is_validated_at_load_and_robust_fields_too():
    cfg, _ = load_config("default", overrides=["attack.enabled=true", "attack.prefix_tokens=2"])
    assert cfg.attack.enabled and cfg.attack.prefix_tokens == 2
    with pytest.raises(ConfigError, match="attack.prefix_tokens=0"):
        load_config("default", overrides=["attack.prefix_tokens=0"])
    with pytest.raises(ConfigError, match="attack.steps=-3"):
        load_config("default", overrides=["attack.steps=-3"])
    with pytest.raises(ConfigError, match="unknown key attack.tokens"):
        load_config("default", overrides=["attack.tokens=3"])
    with pytest.raises(ConfigError, match=r"finetune\.robust\.attack_steps=0"):
        load_config(None, overrides=["finetune.robust.enabled=true", "finetune.robust.attack_steps=0"])
    with pytest.raises(ConfigError, match=r"finetune\.robust\.prefix_tokens=0"):
        RobustConfig(prefix_tokens=0)
    with pytest.raises(ConfigError, match=r"finetune\.robust\.attack_lr=0.0"):
        RobustConfig(attack_lr=0.0)
    with pytest.raises(ConfigError, match=r"finetune\.robust\.attack='gcg'"):
        load_config(None, overrides=["finetune.robust.attack=gcg"])
    with pytest.raises(ConfigError, match=r"finetune\.robust=true is now finetune\.robust\.enabled"):
        load_config(None, overrides=["finetune.robust=true"])


def test_prefix_attack_refuses_zero_tokens_and_negative_steps(tiny_pipe):
    from toolchain.attacks import PromptEncoder, concept_inversion, prefix_attack, soft_prefix_attack

    encoder = PromptEncoder(tiny_pipe.text_encoder, tiny_pipe.tokenizer)
    x = torch.zeros(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    with pytest.raises(ValueError, match="at least one token"):
        prefix_attack(tiny_pipe.unet, encoder, x, x, t, ["a", "b"], 0, 3)
    with pytest.raises(ValueError, match="steps=-1"):
        prefix_attack(tiny_pipe.unet, encoder, x, x, t, ["a", "b"], 2, -1)
    with pytest.raises(ValueError, match="steps=-1"):
        concept_inversion(tiny_pipe.unet, encoder, x, tiny_pipe.scheduler, -1, 0.01, 2)
    ids = encoder.ids(["a", "b"])
    with pytest.raises(ValueError, match="at least one token"):
        soft_prefix_attack(tiny_pipe.unet, encoder, x, x, t, ids, 0, 3, 0.01)
    with pytest.raises(ValueError, match="steps=-1"):
        soft_prefix_attack(tiny_pipe.unet, encoder, x, x, t, ids, 2, -1, 0.01)


# ------------------------------------------------------------------------- mechanics and budgets


def test_prompt_encoder_reproduces_the_text_encoder_and_prefixes_round_trip(tiny_pipe):
    from toolchain.attacks import PromptEncoder

    encoder = PromptEncoder(tiny_pipe.text_encoder, tiny_pipe.tokenizer)
    prompts = ["the number 7", "a handwritten digit seven"]
    ids = encoder.ids(prompts)
    with torch.no_grad():
        plain = encoder.encode_embeddings(encoder.with_prefix(ids, torch.zeros(2, 0, encoder.table.shape[1])))
        assert torch.allclose(plain, tiny_pipe.text_encoder(ids)[0], atol=1e-6)
        prefix_ids = encoder.candidates[torch.tensor([[0, 3], [5, 1]])]
        spliced = encoder.encode_embeddings(encoder.with_prefix(ids, encoder.table[prefix_ids]))
        texts = [f"{p} {q}" for p, q in zip(encoder.decode(prefix_ids), prompts, strict=True)]
        # the found prefix is a real prompt: its text encodes to exactly the spliced tokens
        assert torch.allclose(spliced, tiny_pipe.text_encoder(encoder.ids(texts))[0], atol=1e-6)


def test_prefix_attack_and_inversion_respect_their_budgets(tiny_pipe):
    from diffusers import DDPMScheduler

    from toolchain.attacks import PromptEncoder, attack_batch, concept_inversion, prefix_attack

    encoder = PromptEncoder(tiny_pipe.text_encoder, tiny_pipe.tokenizer)
    scheduler = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["the number 7", "seven", "a drawing of a seven"]
    x_t, t, _ = attack_batch(latents, len(prompts), 2, scheduler, seed=0)
    target = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))
    calls = []
    handle = tiny_pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    try:
        found = prefix_attack(tiny_pipe.unet, encoder, target, x_t, t, prompts, 2, 5, candidates=4, seed=0)
        assert len(calls) == 1 + 2 * 5, "one look at the start, then a gradient and a swap-check pass per step"
        calls.clear()
        judged = []
        prefix_attack(
            tiny_pipe.unet,
            encoder,
            target,
            x_t,
            t,
            prompts,
            1,
            4,
            select=lambda p: judged.append(p) or [0.0] * 3,
            select_every=2,
        )
        assert len(judged) == 2 and all(len(p) == 3 for p in judged), "judged at step 2 and at the end"
        calls.clear()
        calls.clear()
        vector, losses = concept_inversion(tiny_pipe.unet, encoder, latents, scheduler, 4, 0.01, 3)
        assert len(calls) == 4 and len(losses) == 4
    finally:
        handle.remove()
    assert found.steps == 5 and found.prefix_ids.shape == (3, 2)
    assert all(b <= s for b, s in zip(found.loss_best, found.loss_start, strict=True))
    for attacked, prompt, row in zip(found.attacked, prompts, found.prefix_ids, strict=True):
        assert attacked.endswith(prompt)
        assert len(tiny_pipe.tokenizer(attacked).input_ids) == len(tiny_pipe.tokenizer(prompt).input_ids) + 2
        assert set(row.tolist()) <= set(encoder.candidates.tolist())
    assert vector.shape == (encoder.table.shape[1],)
    for k, v in tiny_pipe.unet.state_dict().items():
        assert torch.equal(v, before[k]), f"the attack changed the model: {k}"
        assert tiny_pipe.unet.get_parameter(k).grad is None if k in dict(tiny_pipe.unet.named_parameters()) else True


def test_soft_prefix_attack_spends_its_budget_lowers_the_loss_and_leaves_the_model_alone(tiny_pipe):
    """AdvUnlearn's inner attack: one UNet pass per step, the matching loss falls, the result is
    the prompts' text embeddings with k free prefix embeddings spliced in, no gradient on the UNet."""
    from diffusers import DDPMScheduler

    from toolchain.attacks import PromptEncoder, attack_batch, soft_prefix_attack

    encoder = PromptEncoder(tiny_pipe.text_encoder, tiny_pipe.tokenizer)
    scheduler = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["the number 7", "seven"]
    x_t, t, _ = attack_batch(latents, len(prompts), 2, scheduler, seed=0)
    target = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))
    calls = []
    handle = tiny_pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        cond, losses = soft_prefix_attack(
            tiny_pipe.unet, encoder, target, x_t, t, encoder.ids(prompts), 2, 12, 0.05, seed=0
        )
    finally:
        handle.remove()
    assert len(calls) == 12 and len(losses) == 12
    assert losses[-1] < losses[0], losses
    assert cond.shape == encoder.encode(prompts).shape and not cond.requires_grad
    with torch.no_grad():  # the prompt's own tokens follow the two free ones
        plain = encoder.encode(prompts)
    assert not torch.allclose(cond, plain)
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())


def test_esd_under_attack_asks_the_teacher_about_the_plain_prompt():
    """AdvUnlearn's ESD target: the student sees the attacked conditioning, the teacher's
    negative guidance is computed from the plain forget prompt; `esd.from_anchor` starts the
    guidance from the anchor prompt instead of the empty one."""
    from toolchain.unlearning import ForgetBatch, get_objective

    def student(x, t, c):
        return x * c.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    def teacher(x, t, c):
        return x + c.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    x = torch.ones(1, 1, 2, 2)
    plain, attacked, uncond = (torch.full((1, 3, 2), v) for v in (2.0, 5.0, 0.0))
    esd = get_objective("esd")
    cfg = FinetuneConfig().esd
    with_plain = esd(student, teacher, ForgetBatch(x, torch.zeros(1), attacked, uncond, uncond, plain), cfg)
    # student 5·x = 5, target T(∅) − (T(c) − T(∅)) = 1 − (3 − 1) = −1 with c the plain prompt
    assert with_plain.item() == pytest.approx(36.0)
    without = esd(student, teacher, ForgetBatch(x, torch.zeros(1), attacked, uncond, uncond), cfg)
    assert without.item() == pytest.approx((5.0 - (1.0 - 5.0)) ** 2)
    # esd.from_anchor: base T(a) = 2 for an anchor of 1, target 2 − (3 − 2) = 1
    anchor = torch.full((1, 3, 2), 1.0)
    batch = ForgetBatch(x, torch.zeros(1), attacked, uncond, anchor, plain)
    assert esd(student, teacher, batch, EsdConfig(from_anchor=True)).item() == pytest.approx(16.0)


@pytest.mark.parametrize("inner", ["embedding", "prefix"])
def test_robust_training_needs_the_text_encoder_and_reports_its_cost(tiny_pipe, tmp_path, inner):
    from toolchain.attacks import PromptEncoder
    from toolchain.finetune import prepare_data, train

    fast = dict(samples_per_prompt=2, sample_steps=2, batch_size=4, upper_batch_size=4, checkpoint_every=1000)
    data = prepare_data(
        tiny_pipe, ["the number 1"], [("seven", "a handwritten digit")], FinetuneConfig(**fast), tmp_path / "s"
    )
    assert data.ids.shape == (len(data.emb), tiny_pipe.tokenizer.model_max_length)
    cfg = FinetuneConfig(
        **fast, mode="bilevel", steps=2, upper_every=1, robust=RobustConfig(enabled=True, attack=inner, attack_steps=2)
    )
    student = copy.deepcopy(tiny_pipe.unet)
    with pytest.raises(ConfigError, match="robust"):
        train(student, tiny_pipe.unet, data, cfg, dict(tiny_pipe.scheduler.config), tmp_path / "a")
    encoder = PromptEncoder(tiny_pipe.text_encoder, tiny_pipe.tokenizer)
    _, summary = train(
        student, tiny_pipe.unet, data, cfg, dict(tiny_pipe.scheduler.config), tmp_path / "b", prompt_encoder=encoder
    )
    assert summary["robust"]["attacks"] == 2 and summary["robust"]["attack_s"] > 0
    assert "robust_retain" in summary["final"]


# --------------------------------------------------------------------- on the digits world


def _naive_erasure(digits, tmp_path: Path, **extra):
    """The digits teacher after ESD on the single prompt "seven" (optionally robust)."""
    from toolchain.attacks import PromptEncoder
    from toolchain.finetune import train

    pipe, data = digits
    cfg = FinetuneConfig(**{**NAIVE, **extra})
    encoder = PromptEncoder(pipe.text_encoder, pipe.tokenizer) if cfg.robust.enabled else None
    unet, _ = train(
        copy.deepcopy(pipe.unet), pipe.unet, data, cfg, dict(pipe.scheduler.config), tmp_path, prompt_encoder=encoder
    )
    erased = copy.copy(pipe)
    erased.unet = unet.eval()
    return erased


ATTACK = dict(n_prompts=1, batch=4, images_per_prompt=16, inversion_steps=0, steps=12, select_every=4)


def test_prefix_attack_finds_what_a_keyword_erasure_left(digits):
    """Naive erasure: the word "seven" is blanked in the text encoder (its token embedding made
    that of "digit"), the UNet still draws 7s. The attack must find a prefix that brings them back."""
    from benchmarks.leakage import get_judge
    from toolchain.attacks import attack_concept

    pipe, data = digits
    erased = copy.copy(pipe)
    erased.text_encoder = copy.deepcopy(pipe.text_encoder)
    vocab = pipe.tokenizer.get_vocab()
    with torch.no_grad():
        table = erased.text_encoder.get_input_embeddings().weight
        table[vocab["seven</w>"]] = table[vocab["digit</w>"]]
    latents = data.latents[data.forget_rows]
    report = attack_concept(erased, pipe, latents, ["seven"], "7", get_judge("digits"), AttackConfig(**ATTACK), 10)
    assert report.plain <= 0.25, "the keyword erasure must hide 7 from the plain prompt"
    assert report.prompt_attack >= report.plain + 0.4, report.to_report()
    assert report.prefix_loss_best < report.prefix_loss_start


def test_prefix_attack_stays_at_chance_on_a_model_that_never_learned_the_concept(digits):
    """A randomly initialised UNet of the digits architecture: no prefix can make it draw 7s, so
    attack success stays at the judge's rate on its plain images (the chance rate)."""
    from diffusers import UNet2DConditionModel

    from benchmarks.leakage import get_judge
    from toolchain.attacks import attack_concept

    pipe, data = digits
    torch.manual_seed(0)
    never = copy.copy(pipe)
    never.unet = UNet2DConditionModel.from_config(pipe.unet.config).eval()
    latents = data.latents[data.forget_rows]
    report = attack_concept(never, pipe, latents, ["seven"], "7", get_judge("digits"), AttackConfig(**ATTACK), 10)
    assert abs(report.prompt_attack - report.plain) <= 0.25, report.to_report()


class ConstantJudge:
    """Calls every image `label`: every attack success it judges must then be exactly 1 or 0."""

    name = "constant"
    classes = tuple("0123456789")

    def __init__(self, label: str):
        self.label = label

    def classify(self, images):
        import numpy as np

        labels = np.full(len(images), self.label)
        return SimpleNamespace(labels=labels, probs=np.ones((len(images), 1)))


def _attack_chain(tiny_sd_dir, tiny_pipe, tmp_path):
    """A source -> finetune -> export chain of the tiny model, its stage entries and the attack settings."""
    from export.onnx import export_onnx
    from toolchain.artifact import Artifact
    from toolchain.config import BenchmarkConfig, RunConfig
    from toolchain.stages.benchmark import _evaluation_plan

    onnx_dir = tmp_path / "onnx"
    exported = export_onnx(tiny_pipe, onnx_dir, progress=False)
    chain = [
        Artifact(path=tiny_sd_dir, kind="diffusers", stage="source"),
        Artifact(path=tiny_sd_dir, kind="diffusers", stage="finetune"),
        Artifact(path=onnx_dir, kind="onnx", stage="export", metrics={"files": exported["files"]}),
    ]
    bench = BenchmarkConfig(eval_steps=2, judge="digits")
    budget = AttackConfig(
        enabled=True, n_prompts=2, steps=2, batch=2, images_per_prompt=4, inversion_steps=2, soft_steps=2
    )
    return chain, bench, RunConfig(erase=["7"], attack=budget), _evaluation_plan(chain[0], ["7"], bench)


def test_benchmark_stage_attacks_each_pytorch_stage_and_transfers_the_prompts_to_the_export(
    tiny_sd_dir, tiny_pipe, tmp_path
):
    """`_attack_stages` (the benchmark stage's attack step): both attacks per PyTorch stage, the
    found prompts rerun on the ONNX export; every figure is what the judge says of the images."""
    from benchmarks.leakage import get_judge
    from toolchain.attacks import transfer_rate
    from toolchain.runtime.ort import OrtPipeline
    from toolchain.runtime.pytorch import diffusers_generator
    from toolchain.stages.benchmark import _attack_stages, _pipeline_files

    chain, bench, run_config, evaluation = _attack_chain(tiny_sd_dir, tiny_pipe, tmp_path)
    budget = run_config.attack
    stages = [{"name": a.stage} for a in chain]
    _attack_stages(chain, stages, evaluation, run_config.attack, bench, ["CPUExecutionProvider"], 1)
    judge, n = get_judge("digits"), budget.n_prompts * budget.images_per_prompt
    torch_pipe = diffusers_generator(tiny_pipe, steps=bench.eval_steps, guidance_scale=bench.guidance_scale)
    for entry in stages[:2]:
        attack = entry["attack"]["7"]
        assert attack["attacked_on"] == entry["name"] and len(attack["prompts"]) == 2
        assert attack["budget"]["prefix_tokens"] == 3 and attack["budget"]["steps"] == 2
        assert attack["budget"]["soft_steps"] == 2 and attack["prompt_attack_n"] == n
        # the attacked prompts, drawn again under the attack's seeds, give its figure (one image of slack
        # for a judge decision that float rounding could flip)
        again = transfer_rate(torch_pipe, attack["prompts"], "7", judge, budget.images_per_prompt, budget.seed)
        assert abs(attack["prompt_attack"] - again) <= 1 / n, (attack, again)
    transfer = stages[2]["attack"]["7"]
    assert transfer["attacked_on"] == "finetune" and transfer["prompts"] == stages[1]["attack"]["7"]["prompts"]
    assert transfer["embedding_attack"] is None and transfer["soft_prompt_attack"] is None
    ort_pipe = OrtPipeline(chain[2].path, _pipeline_files(chain[2]), ["CPUExecutionProvider"], 1)

    def exported(prompts, seed):
        return ort_pipe(prompts, seed, steps=bench.eval_steps, guidance_scale=bench.guidance_scale)

    again = transfer_rate(exported, transfer["prompts"], "7", judge, budget.images_per_prompt, budget.seed)
    assert abs(transfer["prompt_attack"] - again) <= 1 / n, (transfer, again)
    untouched = [{"name": a.stage} for a in chain]
    _attack_stages(chain, untouched, evaluation, AttackConfig(), bench, [], 1)  # attack.enabled false
    assert all("attack" not in entry for entry in untouched)


@pytest.mark.parametrize("label, rate", [("7", 1.0), ("3", 0.0)])
def test_every_attack_figure_is_the_judges_share(tiny_sd_dir, tiny_pipe, tmp_path, label, rate, monkeypatch):
    """A judge that calls every image `label`: each attack's success and the plain rate, on every
    stage and through the export, are exactly 1 (label 7) or 0 (another label), never a constant."""
    from benchmarks import leakage
    from toolchain.stages.benchmark import _attack_stages

    monkeypatch.setitem(leakage._JUDGES, "test-constant", ConstantJudge)  # registered for this test only
    chain, bench, run_config, evaluation = _attack_chain(tiny_sd_dir, tiny_pipe, tmp_path)
    evaluation = {**evaluation, "judge": "test-constant", "options": {"label": label}}
    stages = [{"name": a.stage} for a in chain]
    _attack_stages(chain, stages, evaluation, run_config.attack, bench, ["CPUExecutionProvider"], 1)
    for entry in stages[:2]:
        attack = entry["attack"]["7"]
        figures = [attack[k] for k in ("plain", "prompt_attack", "soft_prompt_attack", "embedding_attack")]
        assert figures == [rate] * 4, attack
    assert stages[2]["attack"]["7"]["prompt_attack"] == rate


@pytest.mark.slow  # 80 s on 2 cores; an option of the finetune stage, not the core path
def test_robust_option_lowers_attack_success_relative_to_plain_bilevel_in_a_short_run(digits, tmp_path):
    """8 bilevel steps, each with an ESD upper step on "seven" (cross-attention only), leave an
    erasure the prefix attack breaks (measured: 31% of 48 attacked images are 7s, plain 6%); the
    same 8 steps with the robust option (attacked prompts in half of each forget batch) leave less
    for it to find, with either inner attack (measured: 19% with the continuous soft-prompt attack,
    21% with the discrete prefix search). Deterministic under the fixed seeds and one torch
    thread; under a minute on 2 CPU cores."""
    from benchmarks.leakage import get_judge
    from toolchain.attacks import attack_concept

    pipe, data = digits
    latents = data.latents[data.forget_rows]
    judge = get_judge("digits")
    budget = AttackConfig(**{**ATTACK, "images_per_prompt": 48})
    rates = {}
    for inner in ("plain", "embedding", "prefix"):
        steps = 8 if inner == "embedding" else 4
        attack = "embedding" if inner == "plain" else inner  # plain: robust training off
        robust = RobustConfig(enabled=inner != "plain", attack=attack, attack_steps=steps, retain_weight=0.0)
        erased = _naive_erasure(
            digits,
            tmp_path / inner,
            mode="bilevel",
            steps=8,
            upper_every=1,
            robust=robust,
        )
        report = attack_concept(erased, pipe, latents, ["seven"], "7", judge, budget, 10)
        assert report.plain <= 0.1, "each must erase the plain prompt"
        rates[inner] = report.prompt_attack
    assert rates["plain"] >= 0.25, rates
    assert rates["embedding"] < rates["plain"] and rates["prefix"] < rates["plain"], rates


def test_report_and_plot_show_attack_success_per_stage(tmp_path):
    from benchmarks.plots import ATTACK_PNG, write_plots
    from benchmarks.report import render_markdown

    def attack(prompt, embedding, on):
        soft = None if embedding is None else embedding / 2
        figures = {"prompt_attack": prompt, "soft_prompt_attack": soft, "embedding_attack": embedding}
        return {"7": {"heldout_leakage": 0.0, **figures, "attacked_on": on, "wall_s": 12.0}}

    stages = [
        {"name": "source", "leakage": {"7": 1.0}, "retain_accuracy": 1.0, "attack": attack(1.0, 1.0, "source")},
        {"name": "finetune", "leakage": {"7": 0.0}, "retain_accuracy": 0.97, "attack": attack(0.1, 0.3, "finetune")},
        {"name": "quantize", "leakage": {"7": 0.0}, "retain_accuracy": 0.96, "attack": attack(0.1, None, "finetune")},
    ]
    report = {"model": {}, "stages": stages, "latency": [], "memory": [], "parity": []}
    assert ATTACK_PNG in write_plots(report, {}, tmp_path)
    assert (tmp_path / ATTACK_PNG).stat().st_size > 0
    text = render_markdown({**report, "plots": [ATTACK_PNG]})
    assert "prompt_attack" in text and "embedding_attack" in text and "attacked_on" in text
    assert "soft_prompt_attack" in text


def test_gate_compares_attack_success_but_not_attack_wall_time():
    from benchmarks.regress import compare

    def report(prompt, soft, wall_s):
        figures = {"prompt_attack": prompt, "soft_prompt_attack": soft, "embedding_attack": 0.1, "wall_s": wall_s}
        return {"stages": [{"name": "finetune", "attack": {"7": {**figures, "prompts": ["x 7"], "budget": {}}}}]}

    assert compare(report(0.1, 0.2, 99.0), report(0.1, 0.2, 10.0)) == []
    failed = [r.metric for r in compare(report(0.2, 0.3, 10.0), report(0.1, 0.2, 10.0))]
    assert failed == ["prompt_attack finetune/7", "soft_prompt_attack finetune/7"]


@pytest.mark.parametrize("one_step", [False, True])
def test_images_from_embeddings_are_the_samplers_images_of_those_prompts(tiny_sd_copy, one_step):
    """The soft-prompt and inversion attacks judge images drawn from embeddings: they must be the
    images the model's own sampler draws (for a one-step generator: one unguided call, not 25
    guided DDIM steps), or the attack measures a model nobody ships."""
    import numpy as np

    from toolchain.attacks import PromptEncoder, generate_from_embeddings
    from toolchain.models.io import load_pipeline
    from toolchain.runtime.pytorch import diffusers_generator
    from toolchain.runtime.schedule import write_schedule

    if one_step:
        write_schedule(tiny_sd_copy, [625], "epsilon")
    pipe = load_pipeline(tiny_sd_copy)
    prompts = ["a photo of a cat", "a dog", "a red car"]
    cond = PromptEncoder(pipe.text_encoder, pipe.tokenizer).encode(prompts)
    got = generate_from_embeddings(pipe, cond, seed=3, steps=4, guidance_scale=5.0)
    expected = diffusers_generator(pipe, steps=4, guidance_scale=5.0)(prompts, 3)
    diffusion = diffusers_generator(pipe, steps=4, guidance_scale=5.0, schedule=None)(prompts, 3)
    assert got.shape == expected.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (np.abs(got - diffusion).max() > 1e-3) == one_step
