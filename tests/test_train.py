"""python -m leworld.train and python -m leworld.probe on a tiny dataset: training learns, a killed
run resumes to the same weights, torchrun works, the encoder can start from image pretraining,
and bad input is one clear line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from leworld.checkpoint import load_checkpoint, select
from leworld.models.lewm import LeWorldModel

# a world model small enough for seconds on a CPU
TINY_MODEL = ["model.image_size=32", "model.latent_dim=32", "model.encoder.backbone.widths=[8,16]",
              "model.encoder.backbone.depths=[1,1]", "model.encoder.backbone.stem=small", "model.encoder.projector.hidden=[64]",
              "model.predictor.width=32", "model.predictor.depth=2", "model.predictor.heads=2", "model.predictor.mlp_hidden=64",
              "model.predictor.projector.hidden=[64]", "model.sigreg.num_slices=64", "model.frameskip=2"]
TINY_RUN = ["logger=none", "env=tworoom", "env.kwargs.image_size=32", "env.scale.cpu.episodes=16",
            "env.episode_length=40", "train.batch_size=32", "train.lr=2e-3", "train.log_every=5", "train.val_every=20",
            "train.val_batches=2", "probe.frames=300", "probe.clips=32", "probe.horizon=3", *TINY_MODEL]


def run(verb, *args, **kwargs):
    return subprocess.run([sys.executable, "-m", f"leworld.{verb}", *args], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "tworoom"


@pytest.fixture(scope="module")
def trained(data_path, tmp_path_factory):
    """A short run that first collects its (missing) dataset."""
    run_dir = tmp_path_factory.mktemp("runs") / "trained"
    done = run("train", *TINY_RUN, f"data.path={data_path}", "train.epochs=4", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "collecting it first" in done.stdout
    return run_dir, done.stdout


def test_training_learns_and_leaves_a_probed_checkpoint(trained):
    run_dir, stdout = trained
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert rows[-1]["sigreg"] < 5 and "val_loss" in rows[-1]
    probe = json.loads((run_dir / "probe.json").read_text())
    assert set(probe["r2"]) == {"trained", "random_init"} and "x" in probe["r2"]["trained"]
    assert len(probe["rollout"]["model"]) == 3
    assert "linear probe from latents to the state" in stdout
    model = LeWorldModel.from_checkpoint(run_dir)
    assert model.history == 3 and model.frameskip == 2 and not model.training
    ckpt = load_checkpoint(run_dir)
    assert ckpt.info["kind"] == "world_model" and ckpt.info["step"] == rows[-1]["step"]


def test_probe_command_on_a_checkpoint(trained):
    run_dir, _ = trained
    done = run("probe", f"ckpt={run_dir}", "probe.frames=200", "probe.clips=16", "probe.horizon=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nothing changes" in done.stdout
    assert len(json.loads((run_dir / "probe.json").read_text())["rollout"]["model"]) == 2


def test_a_killed_run_resumes_to_the_same_weights(data_path, tmp_path, trained):
    args = [*TINY_RUN, f"data.path={data_path}", "train.epochs=6", "train.save_every=3", "probe.after_training=false"]
    whole = tmp_path / "whole"
    assert run("train", *args, f"run_dir={whole}").returncode == 0

    killed = tmp_path / "killed"
    job = subprocess.Popen([sys.executable, "-m", "leworld.train", *args, f"run_dir={killed}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None:
        try:
            if load_checkpoint(killed).info["step"] >= 6:
                break
        except Exception:  # not written yet
            pass
        time.sleep(0.02)
    assert job.poll() is None, "the run finished before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    stopped_at = load_checkpoint(killed).info["step"]
    final_step = load_checkpoint(whole).info["step"]
    assert stopped_at < final_step

    done = run("train", "resume=true", f"run_dir={killed}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming at step {stopped_at}" in done.stdout
    a, b = load_checkpoint(whole), load_checkpoint(killed)
    assert b.info["step"] == final_step
    for name in a.tensors:
        if name.startswith(("model.", "optimizer.")):
            assert torch.equal(a.tensors[name], b.tensors[name]), name


def test_torchrun_with_two_processes(data_path, tmp_path, trained):
    run_dir = tmp_path / "ddp"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "leworld.train", *TINY_RUN, f"data.path={data_path}", "train.epochs=1",
                           "train.batch_size=16", f"run_dir={run_dir}", "probe.after_training=false"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert " x 2;" in (run_dir / "console.log").read_text()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one writer
    assert LeWorldModel.from_checkpoint(run_dir).action_dim == 2


def test_encoder_from_image_pretraining(data_path, tmp_path, trained):
    pretrained = tmp_path / "pretrained"
    done = run("pretrain", "logger=none", "data=dataset", f"data.path={data_path}", "views.global.size=32",
               "views.local.size=16", "backbone=convnet_small", "backbone.widths=[8,16]", "backbone.depths=[1,1]",
               "projector.hidden=[32]", "projector.out_dim=16", "loss.sigreg.num_slices=32", "train.epochs=1",
               "train.batch_size=64", f"run_dir={pretrained}")
    assert done.returncode == 0, done.stderr[-2000:]
    backbone = select(load_checkpoint(pretrained).tensors, "backbone")

    for freeze in ("true", "false"):
        run_dir = tmp_path / f"init_{freeze}"
        done = run("train", *TINY_RUN, f"data.path={data_path}", "train.epochs=0.5", f"run_dir={run_dir}",
                   f"model.encoder.init={pretrained}", f"model.encoder.freeze={freeze}", "probe.after_training=false")
        assert done.returncode == 0, done.stderr[-2000:]
        trained_backbone = select(load_checkpoint(run_dir).tensors, "model.backbone")
        same = all(torch.equal(trained_backbone[k], v) for k, v in backbone.items() if not k.endswith("num_batches_tracked"))
        assert same == (freeze == "true")


def one_line_error(done) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    return done.stderr.strip().splitlines()[-1]


def test_bad_input(data_path, tmp_path, trained):
    assert "holds tworoom data, not pusht" in one_line_error(
        run("train", *TINY_RUN, "env=pusht", f"data.path={data_path}", f"run_dir={tmp_path / 'a'}"))
    assert "resume=true needs run_dir" in one_line_error(run("train", "resume=true"))
    assert "does not exist" in one_line_error(run("train", "resume=true", f"run_dir={tmp_path / 'none'}"))
    assert "not an image pretraining one" in one_line_error(
        run("train", *TINY_RUN, f"data.path={data_path}", f"model.encoder.init={trained[0]}", f"run_dir={tmp_path / 'b'}"))
    assert "there is no model=huge" in one_line_error(run("train", "model=huge"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
