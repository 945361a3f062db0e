import json
import os

import pytest
import torch
from trainer_toys import make_trainer

from rnnkit.train.checkpoint import LATEST, has_checkpoint, load_checkpoint
from rnnkit.train.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert read_json(path) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"x": 2})
    assert read_json(path) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_unserialisable_value_leaves_nothing_behind(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "b.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_tensors_round_trip_through_safetensors(tmp_path):
    tensors = {"w": torch.randn(3, 2), "rng": torch.get_rng_state()}
    atomic_save_tensors(tmp_path / "t.safetensors", tensors)
    loaded = load_tensors(tmp_path / "t.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_checkpoint_is_safetensors_and_json_only(tmp_path):
    make_trainer(checkpoint_dir=tmp_path, epochs=1).fit()
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [LATEST, "step-00000003/state.json", "step-00000003/tensors.safetensors"]
    state = json.loads((tmp_path / "step-00000003" / "state.json").read_text())
    assert state["training"]["step"] == 3
    tensors = load_tensors(tmp_path / "step-00000003" / "tensors.safetensors")
    assert tensors["rng.cpu"].dtype == torch.uint8
    assert any(name.startswith("optimizer.") for name in tensors)


def test_a_crash_before_latest_is_updated_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(checkpoint_dir=tmp_path, epochs=1)
    trainer.fit()
    import rnnkit.train.checkpoint as checkpoint

    real = checkpoint.atomic_write_json

    def crash_on_latest(path, value):
        if str(path).endswith(LATEST):
            raise OSError("power cut")
        real(path, value)

    monkeypatch.setattr(checkpoint, "atomic_write_json", crash_on_latest)
    trainer.state.step = 7
    with pytest.raises(OSError, match="power cut"):
        trainer.save_checkpoint()
    assert has_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path).state.step == 3
