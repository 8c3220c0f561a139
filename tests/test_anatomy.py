"""Failure anatomy (leworld/planning/anatomy.py): every failure of an evaluation is classed by the
first solve's costs of the chosen plan and of the dataset's recorded actions, and the numbers
behind the class are the objective's own."""

import json

import numpy as np
import pytest
import torch
from conftest import run

from leworld.dataset import EpisodeDataset
from leworld.models import load_world_model, open_dataset
from leworld.planning import Goals, LatentObjective
from leworld.planning.anatomy import CLASSES, by_object_moved, classify, recorded_plans, replay_reaches

# the goal one plan away: 5 chunks of 2 steps; replanning after 2 chunks, so the open loop covers 2
ONE_PLAN = ["planner.samples=32", "planner.elites=4", "planner.iterations=2", "protocol.episodes=6", "protocol.batch=3",
            "protocol.goal_offset=10", "protocol.budget=12", "protocol.horizon=5", "protocol.receding_horizon=2",
            "protocol.videos=0"]


def test_classes_follow_the_costs():
    success = np.array([True, False, False, False])
    chosen, recorded = np.array([1.0, 2.0, 1.0, 1.0]), np.array([5.0, 1.0, 3.0, 0.5])
    reaches = np.array([True, True, True, False])
    assert classify(success, chosen, recorded, reaches) == [None, "search", "model", "recorded actions miss"]


def test_success_is_split_in_thirds_by_how_far_the_object_moves():
    moved = [0.0, 0.0, 5.0, 10.0, 30.0, 60.0]
    rows = [{"object_moved": m, "success": s} for m, s in zip(moved, [True, True, False, True, False, False])]
    split = by_object_moved(rows, ["block_x", "block_y"])["by_object_moved"]
    assert split["edges"] == pytest.approx(np.quantile(moved, [1 / 3, 2 / 3]).tolist())
    assert split["episodes"] == [2, 2, 2] and split["successes"] == [2, 1, 0]
    assert split["object"] == ["block_x", "block_y"]
    assert by_object_moved(rows, []) == {}  # an env without an object (TwoRoom, Reacher)
    assert by_object_moved([{"success": True}] * 3, ["block_x"]) == {}  # rows from before the split


def test_recorded_actions_replayed_reach_their_goals(trained, data_path):
    """TwoRoom is deterministic: the dataset's actions from a start row reach the state `offset` rows later."""
    dataset = EpisodeDataset.open(data_path)
    model_codec = load_codec(dataset)
    rows = np.array([0, 3, 41])
    plans = recorded_plans(dataset.tensors["action"], rows, model_codec, horizon=5, goal_offset=10)
    assert plans.shape == (3, 1, 5, 2 * 2)
    assert recorded_plans(dataset.tensors["action"], rows, model_codec, horizon=4, goal_offset=10) is None
    starts, goals = (dataset.tensors["state"][rows + k].double().numpy() for k in (0, 10))
    raw = model_codec.to_env(plans[:, 0])
    assert replay_reaches("tworoom", {"image_size": 32}, starts, goals, raw).all()
    far = dataset.tensors["state"][rows + 30].double().numpy()  # 30 steps on: 10 steps do not get there
    assert not replay_reaches("tworoom", {"image_size": 32}, starts, far, raw).all()


def load_codec(dataset):
    from leworld.codec import ActionCodec

    return ActionCodec.from_stats(dataset.meta["stats"]["action"], (-1.0, -1.0), (1.0, 1.0), 2)


def test_every_failure_of_an_eval_is_classed_by_its_own_costs(trained, tmp_path):
    out = tmp_path / "eval"
    done = run("eval", f"ckpt={trained[0]}", *ONE_PLAN, f"out_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    rows, summary = report["episodes"]["planner"], report["summary"]["planner"]
    failed = [r for r in rows if not r["success"]]
    assert summary["failures"] == {name: sum(r["failure"] == name for r in rows) for name in CLASSES}
    assert sum(summary["failures"].values()) == len(failed) and f"failures: {len(failed)} of 6" in done.stdout
    assert all(r["failure"] is None for r in rows if r["success"])
    for r in failed:
        assert r["recorded_reaches"]  # TwoRoom: the recorded actions reach every goal
        assert r["failure"] == ("search" if r["recorded_cost"] < r["plan_cost"] else "model")
        assert len(r["open_loop_error"]) == len(r["moved"]) == 2
    assert "failure" not in report["episodes"]["random"][0]  # random actions: no plan to class

    # the recorded actions' cost is the objective's cost of them from the start frame
    model = load_world_model(trained[0])
    dataset = open_dataset(model)
    index = np.arange(3)
    start_rows = np.array([r["dataset_row"] for r in rows[:3]])
    goals = Goals(dataset.tensors["pixels"][start_rows + 10].numpy(), None, None, None)
    objective = LatentObjective(model, goals, torch.device("cpu"))
    observed = {"pixels": dataset.tensors["pixels"][start_rows][:, None].numpy(), "state": None}
    plans = recorded_plans(dataset.tensors["action"], start_rows, model.codec, 5, 10)
    with torch.no_grad():
        costs = objective.cost_fn(observed, None, index)(plans)[:, 0]
    assert costs.numpy() == pytest.approx([r["recorded_cost"] for r in rows[:3]], rel=1e-4)


def test_the_oracle_scores_the_recorded_actions_at_the_goal(trained, data_path, tmp_path):
    """With the simulator as the model the recorded actions cost their end state's goal cost: about 0 on TwoRoom (units of 224)."""
    out = tmp_path / "oracle"
    done = run("eval", "model=oracle", "env=tworoom", "env.kwargs.image_size=32", f"data_path={data_path}",
               "model.frameskip=2", *ONE_PLAN, f"out_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "eval.json").read_text())["episodes"]["planner"]
    assert all(r["recorded_reaches"] and r["recorded_cost"] == pytest.approx(0.0, abs=1e-2) for r in rows)
    assert all("open_loop_error" not in r for r in rows)  # the simulator predicts itself
