"""`python -m leworld.pretrain` as a user runs it: outputs of a tiny run, and one clear error line
with a non-zero exit for every kind of bad input."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from leworld.nn.preprocess import normalize, to_float
from leworld.checkpoint import load_checkpoint
from leworld.pretrain import LeJEPA, load_encoder, pretrain
from leworld import LeworldError
from leworld.runtime import load_config, run_main
from conftest import run

# A model and run small enough for seconds; with data=shapes also a small generated set.
TINY = ["logger=none", "views.global.size=16", "views.local.size=8", "views.local.count=2",
        "train.batch_size=16", "train.epochs=1", "train.log_every=1", "backbone=convnet_small",
        "backbone.widths=[8,16]", "backbone.depths=[1,1]", "projector.hidden=[32]", "projector.out_dim=16",
        "loss.sigreg.num_slices=32"]
TINY_SHAPES = ["data.per_class=8", "data.size=16"]


def pretrain_cli(*args, cwd=None):
    return run("pretrain", *args, cwd=cwd)


def test_tiny_run_writes_its_folder_and_the_encoder_reloads(tmp_path):
    run = tmp_path / "run"
    done = pretrain_cli(*TINY, *TINY_SHAPES, f"run_dir={run}")
    assert done.returncode == 0, done.stderr
    assert "generated" in done.stdout  # says that it made its own data
    for name in ("config.yaml", "metrics.jsonl", "console.log", "checkpoint.safetensors", "results.json"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and {"loss", "pred", "sigreg", "probe_acc", "lr"} <= set(rows[-1])
    results = json.loads((run / "results.json").read_text())
    assert set(results["eval"]) == {"pretrained", "random_init"}

    ckpt = load_checkpoint(run)
    assert ckpt.info["kind"] == "pretrain" and ckpt.config["backbone"]["widths"] == [8, 16]
    encoder = load_encoder(run)
    assert not encoder.training
    images = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8)
    features = encoder(normalize(to_float(images)))
    assert features.shape == (4, 16) and torch.isfinite(features).all()

    again = pretrain_cli(*TINY, *TINY_SHAPES, f"run_dir={run}")  # never overwrites a finished run
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert load_checkpoint(run).tensors.keys() == ckpt.tensors.keys()


def test_array_data_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "set.npz", images=rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8),
             labels=np.arange(40) % 4)
    done = pretrain_cli(*TINY, "data=array", f"data.path={tmp_path / 'set.npz'}", f"run_dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    assert "32 training / 8 held-out images" in done.stdout


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_bad_input_gives_one_clear_line(tmp_path):
    folder = lambda path, *more: one_error_line(pretrain_cli(*TINY, "data=folder", f"data.path={path}", *more,
                                                             f"run_dir={tmp_path / 'run'}"))
    assert "does not exist" in folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no images" in folder(tmp_path / "empty")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (16, 16)).save(mixed / "a.png")
    Image.new("RGB", (20, 16)).save(mixed / "b.png")
    assert "data.resize" in folder(mixed)

    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("RGB", (16, 16)).save(broken / "a.png")
    (broken / "b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert "b.jpg" in folder(broken)

    cli = lambda *args: one_error_line(pretrain_cli(*TINY, *TINY_SHAPES, *args, cwd=tmp_path))
    assert "data.path is required" in one_error_line(pretrain_cli(*TINY, "data=folder", cwd=tmp_path))
    assert "backbone=resnet50; choose one of: convnet_cpu, convnet_keypoints, convnet_small" in cli("backbone=resnet50")
    assert "unknown backbone name 'resnet'" in cli("backbone.name=resnet")
    assert "bad override" in cli("train.epochz=3")
    for override, message in {"views.global.size=0": "views.global.size=0: it must be an integer >= 8",  # a traceback once
                              "loss.sigreg_weight=2": "loss.sigreg_weight=2: it must be a number >= 0 and <= 1",
                              "views.local.scale=[0.5,0.1]": "views.local.scale=[0.5, 0.1]: it must be [lowest, highest]"}.items():
        with pytest.raises(LeworldError, match=re.escape(message)):  # in this process: quicker than a new interpreter
            pretrain(load_config("pretrain", [*TINY, *TINY_SHAPES, override, f"run_dir={tmp_path / 'run'}"]))
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in cli("device=cuda")
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()  # failed runs leave nothing


def test_help_lists_the_choices():
    done = pretrain_cli("--help")
    assert done.returncode == 0
    assert "backbone=" in done.stdout and "vit_tiny" in done.stdout and "sigreg_weight" in done.stdout


def test_torchrun_with_two_processes(tmp_path):
    """The same command under torchrun: gloo on CPU, one run folder written by rank 0 alone."""
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "leworld.pretrain", *TINY, *TINY_SHAPES, "train.epochs=2", f"run_dir={run}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "x 2 processes" in (run / "console.log").read_text()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one writer: no step logged twice
    assert steps[-1] == 2 * (48 // (2 * 16))  # 48 training images, batch 16 per process, 2 epochs
    assert load_encoder(run)(torch.zeros(1, 3, 16, 16)).shape == (1, 16)


def test_diverging_loss_stops_with_a_clear_error_and_saves_nothing(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real = LeJEPA.forward  # a loss that turns NaN (no valid setting diverges this tiny run: lr is at most 1)
    monkeypatch.setattr(LeJEPA, "forward", lambda self, *views: real(self, *views) | {"loss": real(self, *views)["loss"] * torch.nan})
    with pytest.raises(SystemExit) as stop:
        run_main("pretrain", pretrain, [*TINY, *TINY_SHAPES, "train.epochs=3", f"run_dir={run}"])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: the loss became nan") and "train.lr" in last
    assert not run.exists()  # a run that failed before its first checkpoint leaves no folder to block its command
