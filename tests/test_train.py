"""python -m leworld.train and python -m leworld.probe on a tiny dataset: training learns, a killed
run resumes to the same weights, torchrun works, the encoder can start from image pretraining,
and bad input is one clear line."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from leworld.checkpoint import load_checkpoint, select
from leworld.models.lewm import LeWorldModel
from conftest import TINY_RUN, run


def test_training_learns_and_leaves_a_probed_checkpoint(trained):
    run_dir, stdout = trained
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert rows[-1]["sigreg"] < 5 and "val_loss" in rows[-1]
    probe = json.loads((run_dir / "probe.json").read_text())
    assert set(probe["r2"]) == {"trained", "random_init"} and "x" in probe["r2"]["trained"]
    assert len(probe["rollout"]["model"]) == 3
    assert probe["rollout"]["model"][0] < probe["rollout"]["no_change"][0]
    assert "linear probe from latents to the state" in stdout
    assert "random actions: success" in stdout  # then it planned
    assert len(json.loads((run_dir / "eval" / "eval.json").read_text())["episodes"]["planner"]) == 3
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
    args = [*TINY_RUN, f"data.path={data_path}", "train.epochs=6", "train.save_every=3", "probe_after_training=false"]
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
                           "train.batch_size=16", f"run_dir={run_dir}", "probe_after_training=false"],
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
                   f"model.encoder.init={pretrained}", f"model.encoder.freeze={freeze}", "probe_after_training=false")
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


def test_batchnorm_statistics_are_recalibrated_to_the_current_weights(trained):
    from leworld.data import ClipSampler, EpisodeDataset
    from leworld.train import recalibrate_batchnorm

    model = LeWorldModel.from_checkpoint(trained[0])
    dataset = EpisodeDataset.open(model.train_config["data"]["path"])
    clips = ClipSampler(dataset, np.arange(dataset.num_episodes), 4, model.frameskip)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        norm.running_mean.fill_(5.0)  # stale statistics, as if the weights had moved on
    recalibrate_batchnorm(model, clips, batches=1, batch_size=64, seed=3, device=torch.device("cpu"))
    assert not model.training
    clips.generator.manual_seed(3)
    pixels = clips.sample(64)["pixels"]
    with torch.no_grad():
        eval_latents = model.encode(pixels)
        train_latents = model.train().encode(pixels)  # batch statistics of that same batch
    assert torch.allclose(eval_latents, train_latents, atol=0.05 * train_latents.std().item())
