"""python -m leworld.train and python -m leworld.probe on a tiny dataset: training learns, a killed
run resumes to the same weights in the folder it is given (with exactly its settings, data and
number of processes), a second run in a folder in use is refused, torchrun ranks split one
global batch, the encoder can start from image pretraining, and bad input is one clear line,
found before training, with nothing lost."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from leworld.checkpoint import load_checkpoint, save_checkpoint, select
from leworld.collect import collect
from leworld.dataset import ClipSampler
from leworld.models import load_world_model, open_dataset
from leworld.models.lewm import LeWorldModel
from leworld.runtime import CONFIG_DIR, load_config, run_main
from leworld.train import train
from leworld.training.loop import TimeBudget, held_out_batches, recalibrate_batchnorm, validate
from conftest import TINY_RUN, child_pids, run, run_process


def test_training_learns_and_leaves_a_probed_checkpoint(trained):
    run_dir, stdout = trained
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert rows[-1]["sigreg"] < 5 and "val_loss" in rows[-1]
    probe = json.loads((run_dir / "probe.json").read_text())
    assert set(probe["r2"]) == {"trained", "random_init"} and "x" in probe["r2"]["trained"]
    assert len(probe["rollout"]["model"]) == 3
    assert probe["rollout"]["model"][0] < probe["rollout"]["no_change"][0]
    geometry = probe["geometry"]["trained"]  # what its distance tells apart (tests/test_understanding.py: what it means)
    assert set(geometry["nearest_error"]) == set(geometry["random_error"]) >= {"x", "y"}
    assert geometry["random_error"]["x"] > 0 and 1 <= geometry["effective_dimensions"] <= geometry["latent_dim"]
    assert "linear probe from latents to the state" in stdout and "what the latent distance tells apart" in stdout
    assert "random actions: success" in stdout  # then it planned
    evaluation = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert len(evaluation["episodes"]["planner"]) == 3
    # and it ends with one table of what it achieved, the same figures as probe.json and eval.json
    table = stdout[stdout.index(f"what {run_dir} achieved:"):].splitlines()
    cells = {row[0]: row[1:] for row in (re.split(r"\s{2,}", line.strip()) for line in table[2:])}
    assert cells["probe R² x"] == [f"{probe['r2']['trained']['x']:.3f}", f"{probe['r2']['random_init']['x']:.3f}"]
    ours, floor = evaluation["summary"]["planner"], evaluation["summary"]["random"]
    assert cells["planning success"] == [f"{100 * ours['success_rate']:.1f}% ± {100 * ours['standard_error']:.1f}%",
                                         f"{100 * floor['success_rate']:.1f}% ± {100 * floor['standard_error']:.1f}%"]
    assert cells["clips seen"] == [f"{rows[-1]['step'] * 32 / 1000:.0f}k ({rows[-1]['step']} steps)"]


def test_a_time_budget_sizes_the_run_from_its_speed_and_finishes_its_schedule(data_path, tmp_path, trained):
    run_dir = tmp_path / "budget"
    done = run("train", *TINY_RUN, f"data.path={data_path}", "train.epochs=1000", "train.minutes=0.1",
               "probe_after_training=false", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    fit = re.search(r"0.1 minutes fit (\d+) steps at this speed", done.stdout)
    assert fit, done.stdout
    ckpt = load_checkpoint(run_dir)
    steps = ckpt.info["step"]
    assert steps == ckpt.info["total_steps"] > 25  # past the steps that measured the speed, short of 1000 epochs
    schedule = ckpt.info["schedule"]["lr_lambdas"][0]
    assert schedule["total_steps"] == steps and schedule["warmup_steps"] == int(0.05 * steps)  # saved for a resume
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == steps and last["lr"] == pytest.approx(2e-3 * 0.01)  # the cosine ran to its end
    assert "as many steps as fit in 0.1 minutes" in done.stdout
    again = run("train", "resume=true", f"run_dir={run_dir}")  # the budget's end is the run's end, not 1000 epochs
    assert again.returncode == 2 and f"is complete ({steps} of {steps} steps)" in again.stderr


def test_a_time_budget_stops_at_its_epochs_on_a_machine_fast_enough():
    procs = SimpleNamespace(device=torch.device("cpu"), world_size=1)
    for minutes, expected in ((60.0, 40), (1e-9, 26)):  # an hour fits far more than 40 quick steps; no time fits 1 more
        budget = TimeBudget(minutes, procs, most=40)
        assert budget.total_steps(5, 40, validating=False) is None  # the speed is timed from here
        assert budget.total_steps(25, 40, validating=False) == expected


def test_a_presets_recipe_for_an_env_applies_and_the_command_line_wins():
    recipe = yaml.safe_load((CONFIG_DIR / "recipe" / "lewm_cpu" / "reacher.yaml").read_text())
    preset = yaml.safe_load((CONFIG_DIR / "model" / "lewm_cpu.yaml").read_text())
    assert recipe["model"]["sigreg"]["weight"] != preset["model"]["sigreg"]["weight"]
    reacher = load_config("train", ["env=reacher"])
    assert reacher.model.sigreg.weight == recipe["model"]["sigreg"]["weight"]
    assert reacher.train.epochs == recipe["train"]["epochs"]
    pusht = load_config("train", ["env=pusht"])
    assert reacher.model.predictor == pusht.model.predictor and reacher.model.encoder == pusht.model.encoder  # the rest is the preset's
    assert pusht.model.predictor.width == preset["model"]["predictor"]["width"]
    assert load_config("train", ["env=pusht"]).model.sigreg.weight == preset["model"]["sigreg"]["weight"]
    assert load_config("train", ["env=reacher", "model.sigreg.weight=0.5"]).model.sigreg.weight == 0.5
    paper = yaml.safe_load((CONFIG_DIR / "model" / "lewm_gpu.yaml").read_text())
    assert load_config("train", ["env=reacher", "model=lewm_gpu"]).model.sigreg.weight == paper["model"]["sigreg"]["weight"]


def test_a_lewm_with_proprioception_trains_saves_its_statistics_and_plans_with_cem_and_its_prior(data_path, trained,
                                                                                                tmp_path):
    run_dir = tmp_path / "proprio"
    done = run("train", *TINY_RUN, f"data.path={data_path}", "train.epochs=1", "model.proprio.use=true",
               "probe_after_training=false", "plan_after_training=true", "planner.samples=8", "planner.elites=2",
               "planner.iterations=1", "protocol.episodes=2", "protocol.goal_offset=4", "protocol.budget=4",
               "protocol.horizon=2", "protocol.videos=0", "prior_after_training=true", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    model = load_world_model(run_dir)
    proprio = open_dataset(model).tensors["proprio"][:].float()
    assert model.cfg.proprio.dim == proprio.shape[1]
    torch.testing.assert_close(model.proprio_mean, proprio.mean(0))
    assert "planning success" in done.stdout and "policy prior alone: success" in done.stdout
    # the policy prior, trained after the world model, plans alone on the same tasks, asked again every chunk
    assert load_checkpoint(run_dir / "prior").info["world_model_step"] == load_checkpoint(run_dir).info["step"]
    cem, alone = (json.loads((run_dir / folder / "eval.json").read_text()) for folder in ("eval", "eval-prior"))
    assert alone["settings"]["planner"] == {"name": "prior", "receding_horizon": 1, "shrink_horizon": True}
    assert alone["settings"]["prior"]
    assert [e["dataset_row"] for e in alone["episodes"]["planner"]] == [e["dataset_row"] for e in cem["episodes"]["planner"]]
    assert "random" in cem["summary"] and "random" not in alone["summary"]


def test_the_checkpoint_says_what_the_model_is_for(trained, data_path):
    run_dir, _ = trained
    model = load_world_model(run_dir)
    assert model.history == 3 and model.frameskip == 2 and not model.training
    dataset = open_dataset(model)
    assert model.env.name == "tworoom" and model.env.image_size == 32
    assert model.data.path == str(data_path) and model.data.fingerprint == dataset.fingerprint()
    assert model.data.held_out == tuple(dataset.split(0.1, 0)[1])  # train.yaml's split of this seed
    assert model.codec.mean == tuple(dataset.meta["stats"]["action"]["mean"]) and model.codec.frameskip == 2
    assert model.codec.low == (-1.0, -1.0) and model.codec.high == (1.0, 1.0)  # the env's bounds
    ckpt = load_checkpoint(run_dir)
    assert ckpt.info["kind"] == "world_model" and ckpt.info["step"] == ckpt.info["total_steps"]
    assert ckpt.config["run_dir"] == str(run_dir)


def test_probe_command_on_a_checkpoint(trained):
    run_dir, _ = trained
    done = run("probe", f"ckpt={run_dir}", "probe.frames=200", "probe.clips=16", "probe.horizon=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nothing changes" in done.stdout
    assert len(json.loads((run_dir / "probe.json").read_text())["rollout"]["model"]) == 2


def test_validation_batches_differ_and_validate_averages_them(trained):
    model = load_world_model(trained[0])
    dataset = open_dataset(model)
    clips = ClipSampler(dataset, np.asarray(model.data.held_out), 4, model.codec)
    batches = held_out_batches(clips, 3, 8, seed=0)
    assert not torch.equal(batches[0]["pixels"], batches[1]["pixels"])
    assert not torch.equal(batches[1]["actions"], batches[2]["actions"])
    again = held_out_batches(clips, 3, 8, seed=0)  # the same ones at every validation
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(batches, again))
    scores = validate(model, batches, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        expected = np.mean([float(model.loss(b)["pred"]) for b in batches])
    assert scores["val_pred"] == pytest.approx(expected, rel=1e-5)
    assert set(scores) == {"val_loss", "val_pred", "val_sigreg"}


def kill_at_step(args, run_dir, step):
    """Start a training run and SIGKILL it once its checkpoint has reached `step`."""
    job = subprocess.Popen([sys.executable, "-m", "leworld.train", *args, f"run_dir={run_dir}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None:
        try:
            if load_checkpoint(run_dir).info["step"] >= step:
                break
        except Exception:  # not written yet
            pass
        time.sleep(0.02)
    assert job.poll() is None, "the run finished before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    return load_checkpoint(run_dir).info["step"]


def test_a_killed_run_resumes_to_the_same_weights_in_the_folder_it_is_given(data_path, tmp_path, trained, capsys):
    args = [*TINY_RUN, f"data.path={data_path}", "train.epochs=6", "train.save_every=3", "probe_after_training=false"]
    whole = tmp_path / "whole"
    assert run("train", *args, f"run_dir={whole}").returncode == 0
    killed = tmp_path / "killed"
    stopped_at = kill_at_step(args, killed, 6)
    final_step = load_checkpoint(whole).info["step"]
    assert stopped_at < final_step

    moved = tmp_path / "moved"  # a copy resumes in its own folder; the original is not touched
    shutil.copytree(killed, moved)
    original = (killed / "checkpoint.safetensors").read_bytes()
    # settings given again with the run's own values change nothing, and are accepted
    done = run("train", "resume=true", f"run_dir={moved}", f"data.path={data_path}", "train.save_every=3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming at step {stopped_at}" in done.stdout
    assert (killed / "checkpoint.safetensors").read_bytes() == original
    a, b = load_checkpoint(whole), load_checkpoint(moved)
    assert b.info["step"] == final_step and b.config["run_dir"] == str(moved)
    for name in a.tensors:
        if name.startswith(("model.", "optimizer.")):
            assert torch.equal(a.tensors[name], b.tensors[name]), name
    steps = [json.loads(line)["step"] for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no row repeated by the resume
    whole_steps = [json.loads(line)["step"] for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert steps == whole_steps

    assert "is complete" in one_line_error(run("train", "resume=true", f"run_dir={moved}"))
    assert "drop train.lr" in one_line_error(run("train", "resume=true", f"run_dir={killed}", "train.lr=0.1"))
    # overrides equal to the defaults, not to the run's settings, are refused too (they used to pass, ignored)
    line = train_error(capsys, "resume=true", f"run_dir={killed}", "train.lr=1e-3", "train.epochs=10",
                       "train.batch_size=64", "env=pusht", "model=lewm_cpu")
    for dropped in ("train.lr=1e-3 (the run's: 0.002)", "train.epochs=10 (the run's: 6)",
                    "train.batch_size=64 (the run's: 32)", "env=pusht (the run's: tworoom)",
                    "model=lewm_cpu (the run's: other settings)"):
        assert dropped in line, line
    assert "backbone=convnet_cpu (the run's: vit)" in train_error(capsys, "resume=true", f"run_dir={killed}",
                                                                   "backbone=convnet_cpu")


def test_resume_refuses_another_dataset(data_path, tmp_path, trained, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_path, data)
    args = [*TINY_RUN, f"data.path={data}", "train.epochs=6", "train.save_every=3", "probe_after_training=false"]
    killed = tmp_path / "killed"
    kill_at_step(args, killed, 3)
    meta_json = (data / "meta.json").read_text()
    other = tmp_path / "other"  # another collection of the same sizes: its files, under the run's meta.json
    collect(load_config("collect", [*(a for a in TINY_RUN if a.startswith("env")), "episodes=16", "seed=1", "workers=1",
                                    f"path={other}"]))
    shutil.copytree(other / "tensors", data / "tensors", dirs_exist_ok=True)
    assert ".memmap is not the file this dataset was written with" in train_error(capsys, "resume=true",
                                                                                   f"run_dir={killed}")
    shutil.copytree(data_path / "tensors", data / "tensors", dirs_exist_ok=True)  # the run's own files back
    meta = json.loads(meta_json)
    (data / "meta.json").write_text(json.dumps(meta | {"created": "another day"}))  # collected again
    assert "is not the dataset the run trained on" in one_line_error(run("train", "resume=true", f"run_dir={killed}"))
    shutil.rmtree(data)
    assert "which is gone" in one_line_error(run("train", "resume=true", f"run_dir={killed}"))
    assert not data.exists()  # nothing was collected in its place


def test_a_run_without_run_dir_records_its_folder_and_resumes(data_path, tmp_path, trained):
    done = run("train", *TINY_RUN, f"data.path={data_path}", "train.epochs=0.2", "probe_after_training=false",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs" / "train").iterdir()
    assert load_checkpoint(run_dir).config["run_dir"] == str(run_dir.relative_to(tmp_path))
    assert "is complete" in one_line_error(run("train", "resume=true", f"run_dir={run_dir}"))


def test_torchrun_ranks_split_one_global_batch_and_match_one_process(data_path, tmp_path, trained):
    """Two processes of 8 clips train exactly as one process of 16 (the same global batches): no
    BatchNorm (whose statistics are per process on a CPU) and no dropout, so only the arithmetic differs."""
    exact = ["model.encoder.projector.hidden=[]", "model.predictor.projector.hidden=[]", "model.predictor.dropout=0",
             f"data.path={data_path}", "train.epochs=0.3", "probe_after_training=false"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "leworld.train", *TINY_RUN, *exact, "train.batch_size=8", f"run_dir={ddp}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert " x 2;" in (ddp / "console.log").read_text()
    assert run("train", *TINY_RUN, *exact, "train.batch_size=16", f"run_dir={single}").returncode == 0
    a, b = load_checkpoint(ddp), load_checkpoint(single)
    assert a.info["step"] == b.info["step"] >= 3
    for name, tensor in select(a.tensors, "model").items():
        torch.testing.assert_close(tensor, b.tensors[f"model.{name}"], atol=2e-5, rtol=1e-4, msg=name)

    cut = tmp_path / "cut"  # the 2-process run as if stopped after its first step, resumed by one process
    cut.mkdir()
    save_checkpoint(cut / "checkpoint.safetensors", a.tensors, a.config, **a.info | {"step": 1})
    line = one_line_error(run("train", "resume=true", f"run_dir={cut}"))
    assert "trained on 2 process(es) and this is 1" in line and "torchrun --nproc_per_node=2" in line

    dataset = open_dataset(load_world_model(ddp))
    clips = ClipSampler(dataset, np.arange(dataset.num_episodes), 4, load_world_model(ddp).codec)
    rank0, rank1 = (next(clips.epoch(8, seed=5, shard=(r, 2))) for r in range(2))
    both = next(clips.epoch(16, seed=5))
    assert not torch.equal(rank0["pixels"], rank1["pixels"])  # each rank its own clips ...
    assert torch.equal(torch.cat([rank0["pixels"], rank1["pixels"]]), both["pixels"])  # ... of one global batch


def rank_of(pid: int) -> int:
    """The torchrun rank of a worker process, from its environment."""
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    return int(environ["RANK"])


def test_a_killed_torchrun_process_leaves_the_others_saying_how_to_resume(data_path, tmp_path, trained):
    run_dir = tmp_path / "ddp"
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "leworld.train", *TINY_RUN, f"data.path={data_path}", "train.batch_size=8",
                            "train.epochs=30", "train.save_every=5", "probe_after_training=false", f"run_dir={run_dir}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoint.safetensors").exists():
        time.sleep(0.05)
    ranks = {rank_of(pid): pid for pid in child_pids(job.pid)}
    assert sorted(ranks) == [0, 1] and job.poll() is None
    # rank 0, as the out-of-memory killer might: the only process that logs, so the survivor must say it
    os.kill(ranks[0], signal.SIGKILL)
    out, err = job.communicate(timeout=120)
    assert job.returncode != 0
    assert f"continue with torchrun --nproc_per_node=2 -m leworld.train resume=true run_dir={run_dir}" in out + err
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err[-3000:]  # torchrun's own remains
    assert 0 < load_checkpoint(run_dir).info["step"] < load_checkpoint(run_dir).info["total_steps"]


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
        assert load_checkpoint(run_dir).config["model"]["encoder"]["backbone"]["name"] == "convnet"


def one_line_error(done) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    return done.stderr.strip().splitlines()[-1]


def train_error(capsys, *args) -> str:
    """The one error line of leworld.train run in this process (quicker than a new interpreter)."""
    with pytest.raises(SystemExit) as stop:
        run_main("train", lambda cfg: train(cfg, list(args)), list(args))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in "".join(lines)
    return lines[-1]


def test_bad_settings_are_one_line_before_training(data_path, tmp_path, trained, capsys):
    ok = [*TINY_RUN, f"data.path={data_path}"]
    bad = {"train.epochs=abc": "train.epochs='abc'", "train.batch_size=0": "train.batch_size=0",
           "train.batch_size=-4": "train.batch_size=-4", "train.epochs=-1": "train.epochs=-1",
           "protocol.batch=0": "protocol.batch=0", "protocol.episodes=0": "protocol.episodes=0",
           "probe.frames=0": "probe.frames=0", "data.val_fraction=0": "need episodes the model never trained on",
           "protocol.receding_horizon=9": "protocol.receding_horizon=9", "+train.epchs=2": "take no new keys",
           "train.epchs=2": "--help lists every key", "model=huge": "there is no model=huge",
           "planner.elites=1000": "elites", "probe.horizon=60": "no episode of",
           "protocol.goal_offset=60": "protocol.goal_offset=60",
           "model.predictor.rollout_steps=0": "model.predictor.rollout_steps=0",
           # once tracebacks, a run trained to NaN, or a value accepted that could not work
           "model.frameskip=0": "model.frameskip=0",
           "train.lr=1e300": "train.lr=1e+300: it must be a number > 0 and <= 1", "model.latent_dim=nan": "latent_dim=nan",
           "model.history=0": "model.history=0", "model.sigreg.weight=-1": "model.sigreg.weight=-1",
           "planner.iterations=-1": "planner.iterations=-1", "planner.std=-1": "planner.std=-1",
           "env.kwargs.image_size=100000": "env.kwargs.image_size=100000: it must be an integer >= 8 and <= 1024",
           "model.image_size=64": "holds 32-px frames, which the encoder would upscale",
           "model.predictor.dropout=1": "model.predictor.dropout=1"}
    for override, message in bad.items():
        run_dir = tmp_path / "never"
        line = train_error(capsys, *ok, "plan_after_training=true", override, f"run_dir={run_dir}")
        assert message in line, (override, line)
        assert not run_dir.exists(), override
    for overrides, message in {("planner=gradient", "planner.lr=nan"): "planner.lr=nan",
                               ("planner=mppi", "planner.temperature=-5"): "planner.temperature=-5",
                               ("planner=mppi", "planner.min_std=3"): "min_std <= max_std"}.items():
        assert message in train_error(capsys, *ok, *overrides, f"run_dir={tmp_path / 'c'}")  # planning after or not
    assert "is not a world model that trains" in train_error(capsys, "model=oracle", f"data.path={data_path}",
                                                             f"run_dir={tmp_path / 'c'}")
    assert not (tmp_path / "c").exists()
    assert "holds tworoom data, not pusht" in train_error(capsys, *ok, "env=pusht", f"run_dir={tmp_path / 'a'}")
    assert "holds 32-px frames" in train_error(capsys, *ok, "env.kwargs.image_size=48", f"run_dir={tmp_path / 'a'}")
    assert "not an image pretraining one" in train_error(capsys, *ok, f"model.encoder.init={trained[0]}",
                                                         f"run_dir={tmp_path / 'b'}")
    assert "resume=true needs run_dir" in train_error(capsys, "resume=true")
    assert "does not exist" in train_error(capsys, "resume=true", f"run_dir={tmp_path / 'none'}")
    (tmp_path / "file").write_text("x")
    assert "is a file" in train_error(capsys, *ok, f"run_dir={tmp_path / 'file'}")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_user_folder_at_data_path_is_never_touched(tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "episodes").mkdir(parents=True)
    (folder / "episodes" / "notes.txt").write_text("keep me")
    line = train_error(capsys, *TINY_RUN, f"data.path={folder}", f"run_dir={tmp_path / 'run'}")
    assert str(folder) in line
    assert (folder / "episodes" / "notes.txt").read_text() == "keep me"


def test_faults_before_and_during_training(data_path, tmp_path, trained, capsys, monkeypatch):
    env = os.environ | {"MUJOCO_GL": "nonsense"}  # a machine that cannot render: found before training
    done = run_process("train", *TINY_RUN, f"data.path={data_path}", f"run_dir={tmp_path / 'gl'}", env=env)
    assert "MUJOCO_GL=nonsense" in one_line_error(done) and not (tmp_path / "gl").exists()
    # a loss that diverges before the first checkpoint leaves no run folder behind, so it can be reused
    real = LeWorldModel.loss  # made NaN: no valid setting diverges this tiny run (lr is at most 1)
    monkeypatch.setattr(LeWorldModel, "loss", lambda self, batch: {k: v * torch.nan for k, v in real(self, batch).items()})
    line = train_error(capsys, *TINY_RUN, f"data.path={data_path}", "train.log_every=1", f"run_dir={tmp_path / 'nan'}")
    assert "the loss became nan by step 1; lower train.lr" in line and not (tmp_path / "nan").exists()


def test_an_interrupted_run_names_its_checkpoint_and_the_resume_command(data_path, tmp_path, trained):
    run_dir = tmp_path / "interrupted"
    job = subprocess.Popen([sys.executable, "-m", "leworld.train", *TINY_RUN, f"data.path={data_path}",
                            "train.epochs=30", "train.save_every=2", f"run_dir={run_dir}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           # as from a terminal: a shell's background job inherits SIGINT ignored
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoint.safetensors").exists():
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=60)
    assert job.returncode == 130
    assert f"resume=true run_dir={run_dir}" in out and "is kept" in out


def test_a_second_training_in_a_running_runs_folder_is_refused_and_sigterm_keeps_the_checkpoint(data_path, tmp_path,
                                                                                                 trained, capsys):
    run_dir = tmp_path / "busy"
    args = [*TINY_RUN, f"data.path={data_path}", "train.epochs=30", "train.save_every=2", "probe_after_training=false"]
    first = subprocess.Popen([sys.executable, "-m", "leworld.train", *args, f"run_dir={run_dir}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoint.safetensors").exists():
        time.sleep(0.05)
    for second in ([*args, "train.lr=1e-3", f"run_dir={run_dir}"], ["resume=true", f"run_dir={run_dir}"]):
        assert f"is in use by process {first.pid}" in train_error(capsys, *second)
    assert first.poll() is None, "the first run ended before the second was tried"
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert "stopped by SIGTERM at step" in out and f"resume=true run_dir={run_dir}" in out and "is kept" in out
    ckpt = load_checkpoint(run_dir)
    assert ckpt.config["train"]["lr"] == 2e-3 and 0 < ckpt.info["step"] < ckpt.info["total_steps"]  # its own, whole
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one writer
    # the lock went with the process: the folder can be resumed (here refused only for the changed setting)
    assert "drop train.lr=1e-3" in train_error(capsys, "resume=true", f"run_dir={run_dir}", "train.lr=1e-3")


def test_a_disk_without_room_for_two_checkpoints_is_refused_before_training(data_path, tmp_path, trained, capsys,
                                                                           monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda where: real(where)._replace(free=100_000))
    line = train_error(capsys, *TINY_RUN, f"data.path={data_path}", f"run_dir={tmp_path / 'full'}")
    assert "MB but its disk has 0.1 MB free; free space or choose another run_dir" in line, line
    needed = float(re.search(r"needs ([\d.]+) MB", line)[1])
    one = (trained[0] / "checkpoint.safetensors").stat().st_size / 1e6  # a real checkpoint of this model
    assert 2 * one <= needed <= 2 * one + 2.2  # two of them, and the 1 MiB margin of each
    assert not (tmp_path / "full").exists()


def test_loading_errors_are_one_line(trained, tmp_path):
    ckpt = load_checkpoint(trained[0])
    no_version = tmp_path / "no_version.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, no_version, {"format": "leworld", "config": "{}"})
    assert "no valid format version" in one_line_error(run("eval", f"ckpt={no_version}"))
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads(json.dumps(ckpt.config))
    config["model"]["latent_dim"] = 48  # a config that does not fit the tensors
    save_checkpoint(other / "checkpoint.safetensors", ckpt.tensors, config, **ckpt.info)
    assert "does not fit the model its config describes" in one_line_error(run("eval", f"ckpt={other}"))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    info = {k: v for k, v in ckpt.info.items() if k not in ("action_codec", "env", "data")}
    save_checkpoint(legacy / "checkpoint.safetensors", ckpt.tensors, ckpt.config, **info)
    assert "python -m leworld.train upgrade ckpt=" in one_line_error(run("probe", f"ckpt={legacy}"))


def test_upgrading_a_checkpoint_of_an_older_leworld(trained, tmp_path):
    """An old checkpoint carried the dataset's statistics and its split by config; upgrade turns them
    into the record the current one carries, and the model then plans as before."""
    ckpt = load_checkpoint(trained[0])
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    info = {k: v for k, v in ckpt.info.items() if k not in ("action_codec", "env", "data")}
    dataset = open_dataset(load_world_model(trained[0]))
    info["dataset"] = {"stats": dataset.meta["stats"]}
    save_checkpoint(legacy / "checkpoint.safetensors", ckpt.tensors, ckpt.config, **info)
    done = run("train", "upgrade", f"ckpt={legacy}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (legacy / "checkpoint.v1.safetensors").exists()
    old, new = load_world_model(trained[0]), load_world_model(legacy)
    assert new.codec == old.codec and new.data == old.data and new.env == old.env
    assert "already current" in one_line_error(run("train", "upgrade", f"ckpt={legacy}"))


def test_batchnorm_statistics_are_recalibrated_to_the_current_weights(trained):
    model = load_world_model(trained[0])
    dataset = open_dataset(model)
    clips = ClipSampler(dataset, np.arange(dataset.num_episodes), 4, model.codec)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        norm.running_mean.fill_(5.0)  # stale statistics, as if the weights had moved on
    recalibrate_batchnorm(model, clips, batches=1, batch_size=64, seed=3, device=torch.device("cpu"))
    assert not model.training
    pixels = clips.sample(64, clips.generator(3))["pixels"]
    with torch.no_grad():
        eval_latents = model.encode(pixels)
        train_latents = model.train().encode(pixels)  # batch statistics of that same batch
    assert torch.allclose(eval_latents, train_latents, atol=0.05 * train_latents.std().item())
