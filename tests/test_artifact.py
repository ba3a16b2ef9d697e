import json

import pytest

from toolchain import artifact as art


def test_fingerprint_depends_on_parent_stage_version_and_config():
    base = art.fingerprint("p", "prune", 1, {"ratio": 0.3})
    assert base == art.fingerprint("p", "prune", 1, {"ratio": 0.3})
    others = {
        art.fingerprint("q", "prune", 1, {"ratio": 0.3}),
        art.fingerprint("p", "export", 1, {"ratio": 0.3}),
        art.fingerprint("p", "prune", 2, {"ratio": 0.3}),
        art.fingerprint("p", "prune", 1, {"ratio": 0.5}),
    }
    assert base not in others and len(others) == 4


def test_seal_writes_manifest_last_and_renames(tmp_path):
    partial = tmp_path / "01-prune.partial"
    partial.mkdir()
    (partial / "weights.bin").write_bytes(b"x" * 10)
    a = art.Artifact(path=partial, kind="diffusers", stage="prune", fingerprint="abc", metrics={"params": {"unet": 3}})
    sealed = art.seal(a, tmp_path / "01-prune")
    assert not partial.exists() and sealed.path == tmp_path / "01-prune"
    loaded = art.load(tmp_path / "01-prune")
    assert loaded.fingerprint == "abc" and loaded.metrics == {"params": {"unet": 3}}
    assert json.loads((tmp_path / "01-prune" / "manifest.json").read_text())["kind"] == "diffusers"


def test_load_refuses_folder_without_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a sealed artifact"):
        art.load(tmp_path)


def test_hash_folder_sees_content_changes(tmp_path):
    (tmp_path / "a").write_text("1")
    first = art.hash_folder(tmp_path)
    (tmp_path / "a").write_text("2")
    assert art.hash_folder(tmp_path) != first
