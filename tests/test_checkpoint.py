"""Checkpoints: round trip, atomic replacement under a name of their own, loading into memory (no
mapping keeps a replaced file on disk), and clear errors for bad files."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from leworld import LeworldError
from leworld.checkpoint import FILENAME, load_checkpoint, save_checkpoint, select


def test_round_trip_and_run_folder(tmp_path):
    tensors = {"backbone.w": torch.randn(3, 4), "backbone.b": torch.arange(5), "head.w": torch.ones(2)}
    save_checkpoint(tmp_path / FILENAME, tensors, {"lr": 0.1, "sizes": [1, 2]}, kind="pretrain", step=7)
    ckpt = load_checkpoint(tmp_path)  # a run folder resolves to its checkpoint
    assert ckpt.config == {"lr": 0.1, "sizes": [1, 2]} and ckpt.info == {"kind": "pretrain", "step": 7}
    for name, t in tensors.items():
        assert torch.equal(ckpt.tensors[name], t)
    assert set(select(ckpt.tensors, "backbone")) == {"w", "b"}


def test_saving_replaces_the_previous_file_whole(tmp_path):
    path = tmp_path / FILENAME
    save_checkpoint(path, {"w": torch.zeros(2)}, {}, step=1)
    (tmp_path / (FILENAME + ".partial")).write_bytes(b"a file of the user's")  # a name a writer might have used
    assert load_checkpoint(path).info["step"] == 1
    save_checkpoint(path, {"w": torch.ones(2)}, {}, step=2)
    assert load_checkpoint(path).info["step"] == 2
    assert (tmp_path / (FILENAME + ".partial")).read_bytes() == b"a file of the user's"  # never written nor removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME, FILENAME + ".partial"]  # nothing of ours left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_loaded_checkpoint_is_in_memory_not_mapped(tmp_path):
    """A resumed run replaces its checkpoint: a mapping of the old file would keep its blocks on disk
    (a run with room for two checkpoints would need three) until the run ends."""
    path = tmp_path / FILENAME
    save_checkpoint(path, {"w": torch.randn(256, 1024)}, {}, step=1)
    ckpt = load_checkpoint(path)
    assert str(path) not in Path("/proc/self/maps").read_text()
    save_checkpoint(path, {"w": torch.zeros(256, 1024)}, {}, step=2)
    assert str(path) not in Path("/proc/self/maps").read_text()  # no "(deleted)" file held
    assert ckpt.tensors["w"].abs().sum() > 0  # the tensors loaded before are intact


def test_bad_checkpoints(tmp_path):
    with pytest.raises(LeworldError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    path = tmp_path / FILENAME
    save_checkpoint(path, {"w": torch.randn(100)}, {"a": 1})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(LeworldError, match="truncated or corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(LeworldError, match="truncated or corrupt"):
        load_checkpoint(path)
    save_file({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(LeworldError, match="not a leworld checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")
