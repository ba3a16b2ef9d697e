"""Bad input of every kind: exit code 2, one line without a traceback, and nothing new on disk —
neither in `--out` nor in the model."""

import json
from pathlib import Path

import pytest

from toolchain import artifact as art
from toolchain.cli import main


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _concept(tmp: Path, text: str) -> str:
    file = tmp / "concept.yaml"
    file.write_text(text)
    return str(file)


# case -> (what the case does to (model, tmp) and returns as extra argv / --model / --out, message)
# Each returns a dict with optional keys: args (extra argv), model (replacement --model), out (--out).
CASES = {
    # the model folder
    "missing model path": (lambda m, t: {"model": t / "does-not-exist"}, "no such folder"),
    "not a pipeline": (lambda m, t: {"model": (t / "empty").mkdir() or t / "empty"}, "no model_index.json"),
    "model_index not JSON": (lambda m, t: (m / "model_index.json").write_text("{oops") and {}, "invalid JSON"),
    "component missing": (lambda m, t: _rm(m / "vae") or {}, "missing components ['vae']"),
    "hub id offline": (lambda m, t: {"model": "someorg/some-model"}, "HF_HUB_OFFLINE"),
    # weights
    "pickled weights only": (lambda m, t: _to_bin(m / "unet") or {}, "pickled .bin weights are refused"),
    "truncated safetensors": (
        lambda m, t: _truncate(m / "unet/diffusion_pytorch_model.safetensors") or {},
        "truncated safetensors file",
    ),
    "garbage safetensors": (
        lambda m, t: (m / "vae/diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 64) and {},
        "not a valid safetensors file",
    ),
    "weights of another unet": (
        lambda m, t: _edit_json(m / "unet/config.json", block_out_channels=[32, 32]) or {},
        "weight(s) do not fit config.json",
    ),
    # component configs
    "unet config unbuildable": (
        lambda m, t: _edit_json(m / "unet/config.json", block_out_channels=[36, 64]) or {},
        "cannot build the unet",
    ),
    "unet config not JSON": (lambda m, t: (m / "unet/config.json").write_text("[") and {}, "invalid JSON"),
    "vae config unbuildable": (
        lambda m, t: _edit_json(m / "vae/config.json", norm_num_groups=5) or {},
        "cannot build the vae",
    ),
    "text encoder config unbuildable": (
        lambda m, t: _edit_json(m / "text_encoder/config.json", num_attention_heads=5) or {},
        "cannot build the text_encoder",
    ),
    "text width does not fit unet": (
        lambda m, t: _edit_json(m / "unet/config.json", cross_attention_dim=48) or {},
        "cross_attention_dim=48",
    ),
    "tokenizer max length absurd": (
        lambda m, t: _edit_json(m / "tokenizer/tokenizer_config.json", model_max_length=10**30) or {},
        "model_max_length=",
    ),
    "tokenizer vocab missing": (lambda m, t: (m / "tokenizer/vocab.json").unlink() or {}, "not a CLIP tokenizer"),
    "scheduler unknown class": (
        lambda m, t: _edit_json(m / "scheduler/scheduler_config.json", _class_name="MagicScheduler") or {},
        "not a diffusers scheduler",
    ),
    "scheduler prediction type": (
        lambda m, t: _edit_json(m / "scheduler/scheduler_config.json", prediction_type="noise") or {},
        "prediction_type='noise'",
    ),
    # recipes and overrides
    "unknown target": (lambda m, t: {"target": "tflite"}, "unknown target"),
    "recipe file missing": (lambda m, t: {"recipe": str(t / "nope.yaml")}, "nope.yaml"),
    "recipe not YAML": (lambda m, t: {"recipe": _file(t / "r.yaml", "prune: [")}, "r.yaml"),
    "unknown recipe key": (lambda m, t: {"args": ["prune.rate=0.5"]}, "unknown key prune.rate"),
    "ratio out of range": (lambda m, t: {"args": ["prune.ratio=1.5"]}, "prune.ratio=1.5: must be in [0, 1)"),
    "override of the wrong type": (lambda m, t: {"args": ["benchmark.repeats=many"]}, "benchmark.repeats"),
    "override without a value": (lambda m, t: {"args": ["prune.ratio"]}, "prune.ratio"),
    "unlearning mode without erase": (
        lambda m, t: {"args": ["finetune.enabled=true", "finetune.mode=bilevel"]},
        "erase",
    ),
    "retain image folder missing (found late, in the finetune stage)": (
        lambda m, t: {
            "out": t / "new" / "nested" / "out",  # the folders made for --out go again too
            "args": ["finetune.enabled=true", "finetune.mode=distill", f"finetune.retain_data={t / 'none'}"],
        },
        "no such directory",
    ),
    "unknown from-stage": (
        lambda m, t: {"args": ["--from-stage", "quantize"]},
        "--from-stage quantize: not in this plan",
    ),
    # concept files
    "unknown concept": (lambda m, t: {"args": ["--erase", "unicorn"]}, "no concept file names it"),
    "concept file missing": (lambda m, t: {"args": ["--erase", str(t / "c.yaml")]}, "no such concept file"),
    "concept file unknown key": (
        lambda m, t: {"args": ["--erase", _concept(t, "name: x\njudge: digits\nlabel: '7'\nerase_promts: [a]\n")]},
        "erase_promts",
    ),
    "concept without prompts": (
        lambda m, t: {
            "args": [
                "--erase",
                _concept(t, "name: x\njudge: digits\nlabel: '7'\nerase_prompts: []\n"),
                "finetune.enabled=true",
            ]
        },
        "prompt",
    ),
    # --out
    "out under a file": (lambda m, t: {"out": _file(t / "file", "") and t / "file" / "out"}, "is a file, not a folder"),
    "out equals model": (lambda m, t: {"out": m}, "overlaps --model"),
    "out inside model": (lambda m, t: {"out": m / "runs"}, "overlaps --model"),
    "out contains model": (lambda m, t: {"out": m.parent}, "overlaps --model"),
    "out not a run folder": (lambda m, t: {"out": _user_folder(t)}, "not a compress run folder"),
}


def _rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def _to_bin(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        file.rename(file.with_suffix(".bin"))


def _file(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _user_folder(tmp: Path) -> Path:
    """An --out a user already uses: the old runner deleted all of it."""
    out = tmp / "photos"
    (out / "01-family-photos").mkdir(parents=True)
    (out / "deploy" / "onnx").mkdir(parents=True)
    (out / "deploy" / "onnx" / "mine.txt").write_text("mine")
    (out / "report.md").write_text("my report")
    return out


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_new_on_disk(case, tiny_sd_copy, tmp_path, capsys):
    apply, message = CASES[case]
    given = apply(tiny_sd_copy, tmp_path) or {}
    model = given.get("model", tiny_sd_copy)
    out = Path(given.get("out", tmp_path / "out"))
    model_before = art.hash_folder(tiny_sd_copy)
    before = _snapshot(tmp_path)  # the model copy, --out and everything the case made
    argv = ["--target", given.get("target", "onnx"), "--model", str(model), "--recipe", given.get("recipe", "tiny")]
    code = main([*argv, "--out", str(out), "--no-progress", "-q", *given.get("args", [])])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("compress: error: ")
    assert art.hash_folder(tiny_sd_copy) == model_before, "the model must not change"
    assert _snapshot(tmp_path) == before, "nothing new on disk, in --out or anywhere else"


def test_at_least_25_kinds():
    assert len(CASES) >= 25
