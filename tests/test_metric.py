"""eval metric=change (leworld/planning/metric.py): the planning cost's latent distance measured in
units of one chunk's latent change over the training episodes."""

import json

import numpy as np
import pytest
import torch
from conftest import run

from leworld.eval import run_eval
from leworld.models import load_world_model, open_dataset
from leworld.planning import Goals, LatentObjective
from leworld.planning.metric import change_whitening, measure_in_chunks
from leworld.runtime import run_main

SMALL = ["planner.samples=32", "planner.elites=4", "planner.iterations=2", "protocol.episodes=5", "protocol.batch=3",
         "protocol.goal_offset=10", "protocol.budget=12", "protocol.horizon=3", "protocol.receding_horizon=2",
         "protocol.videos=0", "protocol.random_baseline=false"]


def random_walks(lengths, scales, seed=0) -> torch.Tensor:
    """Episodes of a random walk whose steps have these standard deviations per dimension, each
    episode starting far from where the last one ended -> latents (F, D), the episodes in order."""
    generator = torch.Generator().manual_seed(seed)
    walks = [1000.0 * e + torch.cumsum(torch.randn(n, len(scales), generator=generator) * torch.tensor(scales), 0)
             for e, n in enumerate(lengths)]
    return torch.cat(walks)


def within_episode_changes(latents, starts, lengths, frameskip) -> torch.Tensor:
    return torch.cat([latents[s + frameskip:s + n] - latents[s:s + n - frameskip] for s, n in zip(starts, lengths)])


def test_whitening_makes_one_chunks_change_isotropic_and_ignores_the_gaps_between_episodes():
    lengths, frameskip = np.array([300, 200, 250]), 2
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    latents = random_walks(lengths, [10.0, 1.0, 0.1])
    change = within_episode_changes(latents, starts, lengths, frameskip).double()  # (N, 3)
    A = change_whitening(latents, starts, lengths, frameskip, shrink=0.0).double()
    # A C Aᵀ = I for the covariance C of the within-episode changes: a jump between episodes (1000 a dimension) is no change
    torch.testing.assert_close(A @ torch.cov(change.T) @ A.T, torch.eye(3, dtype=torch.float64), atol=1e-4, rtol=0)
    # so a difference along the direction that changes least per chunk costs the most
    costs = [(A @ torch.eye(3, dtype=torch.float64)[i]).square().sum().item() for i in range(3)]
    assert costs[2] > 50 * costs[1] > 2500 * costs[0]
    # shrunk all the way: the squared L2, divided by the mean variance of a chunk's change
    A1 = change_whitening(latents, starts, lengths, frameskip, shrink=1.0).double()
    d = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close((d @ A1.T).square().sum(-1), d.square().sum(-1) / torch.cov(change.T).diagonal().mean())


def test_the_metric_is_measured_on_training_episodes_and_scores_imagined_plans(trained):
    model = load_world_model(trained[0]).eval().requires_grad_(False)
    dataset = open_dataset(model)
    A = measure_in_chunks(model, dataset, 0.1, torch.device("cpu"))  # (D, D)
    assert A.shape == (model.cfg.latent_dim,) * 2 and torch.isfinite(A).all()
    pixels = dataset.tensors["pixels"][:8].numpy()
    objective = LatentObjective(model, Goals(pixels[:2], np.zeros((2, 1)), None, None), torch.device("cpu"))
    observed, chunks = {"pixels": np.stack([pixels[:3], pixels[3:6]])}, torch.zeros(2, 2, 4)
    plans = torch.randn(2, 6, 3, 4, generator=torch.Generator().manual_seed(0))
    l2 = objective.cost_fn(observed, chunks, np.array([0, 1]))(plans)
    model.metric = A
    measured = objective.cost_fn(observed, chunks, np.array([0, 1]))(plans)
    final = torch.stack([model.rollout(objective.encode(observed["pixels"]), plans[:, s], chunks)[:, -1] for s in range(6)], 1)
    torch.testing.assert_close(measured, ((final - objective.goals[:, None]) @ A.T).square().sum(-1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(measured / measured.sum(1, keepdim=True), l2 / l2.sum(1, keepdim=True), rtol=1e-2)
    # the held-out episodes, where eval's tasks come from, do not enter it
    changed = dataset.tensors["pixels"].clone()
    for e in model.data.held_out:
        changed[dataset.episode_starts[e]:dataset.episode_starts[e] + dataset.episode_lengths[e]] = 0
    dataset.tensors["pixels"] = changed
    model.metric = None
    torch.testing.assert_close(measure_in_chunks(model, dataset, 0.1, torch.device("cpu")), A)


def test_eval_plans_with_the_change_metric(trained, tmp_path):
    out = tmp_path / "change"
    done = run("eval", f"ckpt={trained[0]}", *SMALL, "metric=change", "metric_shrink=0.2", f"out_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "metric=change" in done.stdout and "success" in done.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"]["metric"] == "change" and report["settings"]["metric_shrink"] == 0.2
    latent = tmp_path / "latent"
    assert run("eval", f"ckpt={trained[0]}", *SMALL, f"out_dir={latent}").returncode == 0
    other = json.loads((latent / "eval.json").read_text())
    assert other["settings"]["metric"] == "latent" and "metric_shrink" not in other["settings"]
    rows = lambda r: [e["dataset_row"] for e in r["episodes"]["planner"]]  # noqa: E731
    assert rows(other) == rows(report)  # the same tasks, planned under another cost
    assert [e["final_state"] for e in other["episodes"]["planner"]] != [e["final_state"] for e in report["episodes"]["planner"]]


@pytest.mark.parametrize("args, message", [
    (["metric=steps"], "metric=steps: it must be one of latent, change"),
    (["metric=change", "metric_shrink=0"], "metric_shrink=0"),
    (["metric=change", "metric_shrink=2"], "metric_shrink=2"),
])
def test_bad_metric_settings_are_one_line(trained, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        run_main("eval", run_eval, [f"ckpt={trained[0]}", *args, f"out_dir={tmp_path / 'x'}"])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "x").exists()


def test_the_oracle_takes_no_metric(capsys):
    with pytest.raises(SystemExit):
        run_main("eval", run_eval, ["model=oracle", "env=tworoom", "metric=change"])
    assert "the oracle scores states" in capsys.readouterr().err
