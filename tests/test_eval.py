"""python -m leworld.eval end to end on a tiny trained world model, and its errors."""

import json

import numpy as np
import torch
from conftest import run

from leworld.data import EpisodeDataset
from leworld.eval import LatentObjective, sample_tasks
from leworld.models.lewm import LeWorldModel

SMALL = ["planner.samples=32", "planner.elites=4", "planner.iterations=2", "protocol.episodes=5", "protocol.batch=3",
         "protocol.goal_offset=10", "protocol.budget=12", "protocol.horizon=3", "protocol.receding_horizon=2"]


def test_eval_runs_end_to_end_and_writes_its_files(trained, tmp_path):
    out = tmp_path / "eval"
    done = run("eval", f"ckpt={trained[0]}", *SMALL, f"out_dir={out}", "protocol.videos=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "success" in done.stdout and "random actions: success" in done.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"]["protocol"]["budget"] == 12 and report["settings"]["planner"]["name"] == "cem"
    for name in ("planner", "random"):
        rows = report["episodes"][name]
        assert len(rows) == 5
        assert {"dataset_row", "success", "steps", "final_distance"} <= set(rows[0])
        assert all(1 <= r["steps"] <= 12 and (r["success"] or r["steps"] == 12) for r in rows)
    assert report["summary"]["planner"]["solves"] >= 2 * 2  # two batches, budget 12 > 2 blocks of 2 steps
    assert [r["dataset_row"] for r in report["episodes"]["planner"]] == [r["dataset_row"] for r in report["episodes"]["random"]]
    assert sorted(p.name for p in out.glob("*.gif")) == ["episode_0.gif", "episode_1.gif"]


def test_every_planner_runs(trained, tmp_path):
    for planner in ("mppi", "gradient"):
        extra = ["planner.samples=32", "planner.elites=4", "planner.iterations=2"] if planner == "mppi" else \
            ["planner.restarts=2", "planner.steps=3"]
        done = run("eval", f"ckpt={trained[0]}", f"planner={planner}", *extra, *SMALL[3:], "protocol.random_baseline=false",
                   "protocol.videos=0", f"out_dir={tmp_path / planner}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(json.loads((tmp_path / planner / "eval.json").read_text())["episodes"]["planner"]) == 5


def test_latent_objective_encodes_context_and_goal_once_per_solve(trained):
    model = LeWorldModel.from_checkpoint(trained[0])
    dataset = EpisodeDataset.open(model.train_config["data"]["path"])
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    pixels = dataset.tensors["pixels"][:8].numpy()
    objective = LatentObjective(model, pixels[:2], torch.device("cpu"))
    blocks = torch.zeros(2, 2, 4)
    cost = objective.cost_fn({"pixels": np.stack([pixels[:3], pixels[3:6]])}, blocks, np.array([0, 1]))
    for _ in range(5):
        costs = cost(torch.randn(2, 7, 3, 4))
    assert costs.shape == (2, 7) and len(calls) == 2  # goal once, context once, none per cost call
    # the cost is the distance of the imagined final latent to the goal latent
    goal, context = objective.goals, objective.encode(np.stack([pixels[:3], pixels[3:6]]))
    plans = torch.randn(2, 1, 3, 4)
    final = model.rollout(context, plans[:, 0], blocks)[:, -1]
    assert torch.allclose(cost(plans)[:, 0], (final - goal).square().sum(-1), rtol=1e-4)


def test_tasks_stay_inside_held_out_episodes(trained):
    dataset = EpisodeDataset.open(LeWorldModel.from_checkpoint(trained[0]).train_config["data"]["path"])
    _, held_out = dataset.split(0.1, 0)
    rows = sample_tasks(dataset, held_out, 200, 10, seed=3)
    episode = np.searchsorted(dataset.episode_starts, rows, side="right") - 1
    assert np.isin(episode, held_out).all()
    assert (rows + 10 < dataset.episode_starts[episode] + dataset.episode_lengths[episode]).all()
    assert np.array_equal(rows, sample_tasks(dataset, held_out, 200, 10, seed=3))


def one_line_error(done) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    return done.stderr.strip().splitlines()[-1]


def test_bad_input(trained, tmp_path):
    assert "does not exist" in one_line_error(run("eval", f"ckpt={tmp_path / 'nothing'}"))
    assert "is a tworoom world model, not pusht" in one_line_error(run("eval", f"ckpt={trained[0]}", "env=pusht"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((trained[0] / "checkpoint.safetensors").read_bytes()[:1000])
    assert "truncated or corrupt" in one_line_error(run("eval", f"ckpt={broken}"))
    assert "there is no planner=newton" in one_line_error(run("eval", f"ckpt={trained[0]}", "planner=newton"))
    assert "elites" in one_line_error(run("eval", f"ckpt={trained[0]}", "planner.elites=1000", f"out_dir={tmp_path / 'x'}"))
