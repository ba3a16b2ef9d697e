import json
from pathlib import Path

import pytest

from toolchain.config import (
    CONFIG_DIR,
    MOVED_FINETUNE_KEYS,
    ConfigError,
    EsdConfig,
    FinetuneConfig,
    RunConfig,
    from_dict,
    load_concept,
    load_config,
    parse_override,
)
from toolchain.validate import validate_file

SHIPPED = sorted(CONFIG_DIR.glob("*/*.yaml"))


def test_shipped_yaml_exists():
    kinds = {p.parent.name for p in SHIPPED}
    assert {"recipes", "targets"} <= kinds
    assert {"default.yaml", "tiny.yaml"} <= {p.name for p in (CONFIG_DIR / "recipes").glob("*.yaml")}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_yaml_validates(path):
    assert validate_file(path) == path.parent.name
    assert path.read_text().startswith("#"), "every shipped YAML starts with a comment saying what it does"


def test_precedence_recipe_then_target_then_overrides():
    cfg, sources = load_config("tiny", "onnx", ["prune.ratio=0.5", "benchmark.repeats=7"])
    assert cfg.prune.ratio == 0.5 and cfg.benchmark.repeats == 7
    assert cfg.benchmark.warmup == 1  # from the tiny recipe
    assert cfg.target == "onnx" and sources["recipe"].endswith("tiny.yaml")


def test_override_parsing():
    assert parse_override("a.b=0.5") == {"a": {"b": 0.5}}
    assert parse_override("export.components=[unet]") == {"export": {"components": ["unet"]}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("prune.ratio")


def test_exponent_floats_without_a_dot_are_floats():
    """YAML 1.1 reads `1e-3` as a string; a learning rate written so must still load."""
    cfg, _ = load_config("tiny", "onnx", ["finetune.lower_lr=1e-3", "finetune.upper_lr=5E-4"], [])
    assert cfg.finetune.lower_lr == 1e-3 and cfg.finetune.upper_lr == 5e-4
    with pytest.raises(ConfigError, match="must be of type float"):
        load_config("tiny", "onnx", ["finetune.lower_lr=fast"], [])


@pytest.mark.parametrize(
    "override, message",
    [
        ("prune.ratio=1.0", r"prune.ratio=1.0: must be in \[0, 1\)"),
        ("prune.ratio=-0.1", "must be in"),
        ("prune.ratoi=0.5", "unknown key prune.ratoi; valid keys here: method, ratio, importance"),
        ("prune.importance=hessian", "must be one of"),
        ("export.opset=11", "lowest supported opset is 14"),
        ("export.components=[unet,foo]", "unknown"),
        ("benchmark.repeats=0", "must be >= 1"),
        ("benchmark.repeats=two", "must be of type int"),
        ("nonsense=1", "unknown key nonsense"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, "onnx", [override])


def test_unknown_target_and_recipe():
    with pytest.raises(ConfigError, match="unknown target"):
        load_config(None, "tflite")
    with pytest.raises(ConfigError, match="no such recipe"):
        load_config("nope", "onnx")


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="type int"):
        from_dict(RunConfig, {"benchmark": {"repeats": True}})


def test_recipe_file_with_unknown_key(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prune:\n  ratio: 0.2\nquantise: {}\n")
    with pytest.raises(ConfigError, match="unknown key quantise"):
        load_config(str(recipe), "onnx")


def test_concepts_resolve_by_alias():
    if not list((CONFIG_DIR / "concepts").glob("digit-7.yaml")):
        pytest.skip("digit concept files not present")
    assert load_concept("7").name == load_concept("digit-7").name == load_concept("seven").name
    with pytest.raises(ConfigError, match="no concept file"):
        load_concept("unicorn")


def test_concept_without_prompts_is_refused(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("name: empty\njudge: digits\nlabel: '1'\nerase_prompts: []\n")
    with pytest.raises(ConfigError, match="erase_prompts is empty"):
        load_concept(str(path))


@pytest.mark.parametrize("old", sorted(MOVED_FINETUNE_KEYS))
def test_flat_finetune_keys_are_refused_with_their_new_name(old):
    """A recipe written for the flat FinetuneConfig fails naming the new key, which exists and loads."""
    import dataclasses

    new = MOVED_FINETUNE_KEYS[old]
    section, leaf = new.split(".")
    default = getattr(getattr(FinetuneConfig(), section), leaf)
    with pytest.raises(ConfigError, match=rf"^finetune\.{old} is now finetune\.{section}\.{leaf}$"):
        load_config(None, None, [f"finetune.{old}={json.dumps(default)}"])
    cfg, _ = load_config(None, None, [f"finetune.{new}={json.dumps(default)}"])
    assert getattr(getattr(cfg.finetune, section), leaf) == default
    assert leaf in {f.name for f in dataclasses.fields(getattr(cfg.finetune, section))}


def test_robust_as_a_bool_names_its_enabled_key():
    with pytest.raises(ConfigError, match=r"^finetune\.robust=true is now finetune\.robust\.enabled$"):
        load_config(None, None, ["finetune.robust=true"])
    cfg, _ = load_config("robust-erase", None, [])
    assert cfg.finetune.robust.enabled and cfg.finetune.esd == EsdConfig(eta=2.0, from_anchor=True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.esd.eta=-1", r"finetune\.esd\.eta=-1\.0: must be >= 0"),
        ("finetune.sfd.steps=0", r"finetune\.sfd\.steps=0: must be >= 1"),
        ("finetune.penalty.inner_steps=0", r"finetune\.penalty\.inner_steps=0: must be >= 1"),
        ("finetune.robust.attacked_share=2", r"finetune\.robust\.attacked_share=2\.0: must be in \[0, 1\]"),
        ("finetune.erasediff.lambda_bome=-0.5", r"finetune\.erasediff\.lambda_bome=-0\.5: must be >= 0"),
        ("finetune.sfd.bogus=1", r"unknown key finetune\.sfd\.bogus; valid keys here: steps, timesteps"),
    ],
)
def test_sub_config_values_are_checked_with_their_full_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, None, [override])


def test_each_objective_receives_only_its_own_sub_config():
    cfg = FinetuneConfig(esd=EsdConfig(eta=3.0))
    assert cfg.objective_settings == EsdConfig(eta=3.0)
    assert FinetuneConfig(objective="erasediff").objective_settings == FinetuneConfig().erasediff
    assert FinetuneConfig(objective="all-but-one").objective_settings == FinetuneConfig().all_but_one
    assert FinetuneConfig(objective="ablation").objective_settings is None
    assert FinetuneConfig(objective="override").objective_settings is None
