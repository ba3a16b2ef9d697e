"""The digits world: shipped model, judge, metrics, training steps, concept files."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks import leakage, quality  # noqa: E402
from benchmarks.testbed import digits  # noqa: E402
from toolchain.runtime.pytorch import diffusers_generator  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "toolchain" / "assets" / "digits-sd"
CONCEPTS = ROOT / "configs" / "concepts"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def judge():
    return leakage.get_judge("digits")


def _quality_images(pipe, generate_seed=0):
    """2 images per digit over 2 phrasings (one training, one held-out): 40 images, 25 DDIM steps."""
    prompts, labels = [], []
    for d in range(10):
        for prompt in (digits.train_prompts(d)[0], digits.heldout_prompts(d)[0]):
            prompts += [prompt] * 2
            labels += [str(d)] * 2
    generate = diffusers_generator(pipe, steps=25)
    return generate(prompts, generate_seed), labels


def test_shipped_folder_loads_offline_and_generates(pipe):
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == digits.IMAGE_SIZE
    images = diffusers_generator(pipe, steps=5)(["the number 7", ""], 0)
    assert images.shape == (2, 16, 16, 3)
    assert images.dtype == np.float32 and images.min() >= 0.0 and images.max() <= 1.0
    again = diffusers_generator(pipe, steps=5, batch_size=1)(["the number 7", ""], 0)
    np.testing.assert_allclose(images, again, atol=1e-5)  # independent of batching


def test_tokenizer_covers_every_phrasing(pipe):
    vocab = pipe.tokenizer.get_vocab()
    for d in range(10):
        for prompt in digits.all_prompts(d) + [digits.ANCHOR_PROMPT]:
            tokens = pipe.tokenizer.tokenize(prompt)
            assert tokens and all(t in vocab for t in tokens), (prompt, tokens)
            assert len(tokens) + 2 <= pipe.tokenizer.model_max_length


def test_judge_accuracy_on_heldout_real_digits(judge):
    from benchmarks.testbed.judge import judge_report

    report = judge_report()
    assert report["judge_eval_accuracy"] >= 0.97
    assert report["judge_eval_accuracy_via_16x16"] >= 0.97


def test_judge_is_deterministic_and_takes_any_layout(judge):
    split = digits.load_split()
    up = digits.upsample(split.judge_eval_images[:20])
    rgb = np.repeat(up[..., None], 3, axis=-1)
    a, b = judge.classify(up), judge.classify(rgb)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.probs.sum(1), 1.0, rtol=1e-6)
    assert judge.features(rgb).shape == (20, 20)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        judge.classify(up * 2 - 1)


def test_leakage_rate_on_real_digits(judge):
    split = digits.load_split()
    images = digits.upsample(split.judge_eval_images)  # as a generator would draw them
    sevens = images[split.judge_eval_labels == 7]
    others = images[split.judge_eval_labels != 7]
    assert leakage.leakage_rate(sevens, judge, "7") >= 0.95
    assert leakage.leakage_rate(others, judge, "7") <= 0.05
    assert leakage.retain_accuracy(images, split.judge_eval_labels, judge) >= 0.97


def test_judge_fid_orders_real_above_noise(judge):
    split = digits.load_split()
    fid_real = quality.judge_fid(split.generator_images[:300], split.heldout_images, judge)
    noise = np.random.default_rng(0).random((300, 8, 8)).astype(np.float32)
    assert fid_real < quality.judge_fid(noise, split.heldout_images, judge) / 10


def test_evaluate_concepts_with_a_fake_generator(judge):
    split = digits.load_split()
    by_label = {str(d): digits.upsample(split.judge_eval_images[split.judge_eval_labels == d]) for d in range(10)}

    def generate(prompts, seed):  # draws the real digit the prompt names; "seven" prompts draw a one
        rng = np.random.default_rng(seed)
        names = ["1" if "seven" in p else next(c for c in p if c.isdigit()) for p in prompts]
        return np.stack([by_label[n][rng.integers(len(by_label[n]))] for n in names])

    scores = leakage.evaluate_concepts(
        generate, judge, {"7": ["seven"]}, {"3": ["the number 3"], "5": ["5"]}, n_per_prompt=8, seed=0
    )
    assert scores.leakage == {"7": 0.0} and scores.n_images == 24
    assert scores.retain_accuracy >= 0.95 and scores.fid is not None
    assert set(scores.to_report()) == {"leakage", "retain_accuracy", "fid"}


def test_one_training_step_of_each_model_runs(tmp_path):
    from benchmarks.testbed import train_digits as T

    torch.manual_seed(0)
    vae = T.build_vae()
    pixels = torch.from_numpy(digits.to_model_range(digits.upsample(digits.load_split().generator_images[:4])))
    loss = T.vae_train_step(vae, torch.optim.AdamW(vae.parameters(), 1e-3), pixels, kl_weight=1e-4)
    assert np.isfinite(loss)

    tokenizer = T.build_tokenizer(tmp_path / "tokenizer")
    text_encoder = T.build_text_encoder(tokenizer, hidden=32, layers=1)
    unet = T.build_unet(32, block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(text_encoder.parameters()), 1e-3)
    ids = tokenizer(["the number 7", ""], padding="max_length", max_length=T.MAX_LENGTH, return_tensors="pt").input_ids
    before = text_encoder.text_model.embeddings.token_embedding.weight.clone()
    loss = T.unet_train_step(unet, text_encoder, opt, T.build_noise_scheduler(), torch.randn(2, 4, 8, 8), ids)
    assert np.isfinite(loss)
    assert not torch.equal(before, text_encoder.text_model.embeddings.token_embedding.weight)  # trained jointly


def test_quality_bar_on_a_reduced_sample(pipe, judge):
    images, labels = _quality_images(pipe)
    assert leakage.retain_accuracy(images, labels, judge) >= 0.85


def test_quality_bar_fails_for_an_untrained_unet(pipe, judge):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    random_unet = UNet2DConditionModel.from_config(pipe.unet.config)
    untrained = StableDiffusionPipeline(**{**pipe.components, "unet": random_unet})
    images, labels = _quality_images(untrained)
    assert leakage.retain_accuracy(images, labels, judge) < 0.85


def test_committed_concept_files_match_the_generator(tmp_path):
    written = digits.write_concept_files(tmp_path)
    assert [p.name for p in written] == [f"digit-{d}.yaml" for d in range(10)]
    for path in written:
        assert (CONCEPTS / path.name).read_text() == path.read_text(), f"regenerate {CONCEPTS / path.name}"


def test_concept_files_follow_the_schema():
    import yaml

    for d in range(10):
        text = (CONCEPTS / f"digit-{d}.yaml").read_text()
        assert text.startswith("# Erase the digit")
        spec = yaml.safe_load(text)
        assert set(spec) == {"name", "aliases", "judge", "label", "erase_prompts", "heldout_prompts",
                             "retain_prompts", "anchor_prompt"}  # fmt: skip
        assert spec == digits.concept_spec(d)
        assert spec["judge"] in leakage.judge_names()
        assert len(spec["retain_prompts"]) == 9 and str(d) not in spec["retain_prompts"]
        assert not set(spec["erase_prompts"]) & set(spec["heldout_prompts"])
