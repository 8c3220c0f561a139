"""python -m leworld.eval end to end on a tiny trained world model, and its errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run, train_probe_and_plan
from omegaconf import OmegaConf

import envs
from leworld.bench.planning import PlanningSolve
from leworld.codec import ActionCodec
from leworld.dataset import EpisodeDataset
from leworld.eval import run_eval
from leworld.planning import Goals, LatentObjective, SimulatorObjective, run_protocol, sample_tasks
from leworld.runtime import run_main
from leworld.models import load_world_model, open_dataset

SMALL = ["planner.samples=32", "planner.elites=4", "planner.iterations=2", "protocol.episodes=5", "protocol.batch=3",
         "protocol.goal_offset=10", "protocol.budget=12", "protocol.horizon=3", "protocol.receding_horizon=2"]


def check_episodes(rows, dataset, budget=12, offset=10):
    """Every row agrees with the simulator: the state where stepping stopped meets the goal exactly
    when the row says success (latched: stepping stops there), and a failure used the whole budget."""
    env = envs.make("tworoom", image_size=32)
    for r in rows:
        goal = dataset.tensors["state"][r["dataset_row"] + offset].double().numpy()
        final = np.asarray(r["final_state"])
        assert env.success(final, goal) == r["success"]
        assert r["final_distance"] == pytest.approx(env.distance(final, goal))
        assert r["steps"] == budget if not r["success"] else 1 <= r["steps"] <= budget


def test_eval_runs_end_to_end_and_writes_its_files(trained, tmp_path):
    out = tmp_path / "eval"
    done = run("eval", f"ckpt={trained[0]}", *SMALL, f"out_dir={out}", "protocol.videos=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "success" in done.stdout and "random actions: success" in done.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"]["protocol"]["budget"] == 12 and report["settings"]["planner"]["name"] == "cem"
    model = load_world_model(trained[0])
    assert ActionCodec.from_dict(report["settings"]["action_codec"]) == model.codec
    dataset = open_dataset(model)
    for name in ("planner", "random"):
        rows = report["episodes"][name]
        assert len(rows) == 5
        check_episodes(rows, dataset)
        episode = np.searchsorted(dataset.episode_starts, [r["dataset_row"] for r in rows], side="right") - 1
        assert np.isin(episode, model.data.held_out).all()  # tasks from the held-out episodes only
    assert report["summary"]["planner"]["solves"] >= 2 * 2  # two batches, budget 12 > 2 chunks of 2 steps
    assert [r["dataset_row"] for r in report["episodes"]["planner"]] == [r["dataset_row"] for r in report["episodes"]["random"]]
    # each episode beside its goal, and what the model imagined (its run trained a pixel decoder after the model)
    assert sorted(p.name for p in out.glob("*.gif")) == ["episode_0.gif", "episode_1.gif", "imagined_0.gif",
                                                          "imagined_1.gif"]
    assert (out / "eval.png").is_file()


def test_every_planner_runs(trained, tmp_path):
    dataset = open_dataset(load_world_model(trained[0]))
    for planner in ("mppi", "gradient"):
        extra = ["planner.samples=32", "planner.elites=4", "planner.iterations=2"] if planner == "mppi" else \
            ["planner.restarts=2", "planner.steps=3"]
        done = run("eval", f"ckpt={trained[0]}", f"planner={planner}", *extra, *SMALL[3:], "protocol.random_baseline=false",
                   "protocol.videos=0", f"out_dir={tmp_path / planner}")
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads((tmp_path / planner / "eval.json").read_text())
        assert report["settings"]["planner"]["name"] == planner and "random" not in report["summary"]
        check_episodes(report["episodes"]["planner"], dataset)
        # a batch is planned for again after every 2 executed chunks of 2 steps while any of it is unsolved
        steps = [r["steps"] for r in report["episodes"]["planner"]]
        assert report["summary"]["planner"]["solves"] == sum(-(-max(steps[i:i + 3]) // 4) for i in (0, 3))


def test_plans_are_searched_in_the_models_own_action_space(trained, tmp_path):
    """A dataset with other action statistics (re-collected, or another one passed as data_path)
    must not change what the planner does: the codec comes from the checkpoint."""
    model = load_world_model(trained[0])
    dataset = open_dataset(model)
    other = tmp_path / "other"
    shutil.copytree(dataset.path, other)
    meta = json.loads((other / "meta.json").read_text())
    stats = meta["stats"]["action"]
    stats["mean"] = [m + 0.5 for m in stats["mean"]]
    stats["std"] = [3 * s for s in stats["std"]]
    (other / "meta.json").write_text(json.dumps(meta))
    other_dataset = EpisodeDataset.open(other)
    assert other_dataset.fingerprint() != dataset.fingerprint()
    rows = sample_tasks(dataset, np.asarray(model.data.held_out), 4, 10, seed=1)
    planner = OmegaConf.create({"name": "cem", "samples": 16, "elites": 4, "iterations": 2, "std": 1.0})
    protocol = OmegaConf.create({"batch": 4, "goal_offset": 10, "budget": 8, "horizon": 2, "receding_horizon": None})
    here, _, _ = run_protocol(model, dataset, rows, planner, protocol, 0, torch.device("cpu"))
    there, _, _ = run_protocol(model, other_dataset, rows, planner, protocol, 0, torch.device("cpu"))
    assert [r["final_state"] for r in here] == [r["final_state"] for r in there]
    done = run("eval", f"ckpt={trained[0]}", f"data_path={other}", *SMALL, f"out_dir={tmp_path / 'x'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "another dataset than the model's" in done.stdout


def goals(pixels: np.ndarray) -> Goals:
    """Goals of goal frames alone, for models that see pixels only."""
    return Goals(pixels, np.zeros((len(pixels), 1)), None, None)


def test_latent_objective_encodes_context_and_goal_once_per_solve(trained):
    model = load_world_model(trained[0])
    dataset = open_dataset(model)
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    pixels = dataset.tensors["pixels"][:8].numpy()
    objective = LatentObjective(model, goals(pixels[:2]), torch.device("cpu"))
    chunks = torch.zeros(2, 2, 4)
    cost = objective.cost_fn({"pixels": np.stack([pixels[:3], pixels[3:6]])}, chunks, np.array([0, 1]))
    for _ in range(5):
        costs = cost(torch.randn(2, 7, 3, 4))
    assert costs.shape == (2, 7) and len(calls) == 2  # goal once, context once, none per cost call
    # the cost is the distance of the imagined final latent to the goal latent
    goal, context = objective.goals, objective.encode(np.stack([pixels[:3], pixels[3:6]]))
    plans = torch.randn(2, 1, 3, 4)
    final = model.rollout(context, plans[:, 0], chunks)[:, -1]
    assert torch.allclose(cost(plans)[:, 0], (final - goal).square().sum(-1), rtol=1e-4)
    # costed an environment at a time (a CPU's cache-sized calls), the same costs
    one_at_a_time = LatentObjective(model, goals(pixels[:2]), torch.device("cpu"), rows_per_call=7)
    plans = torch.randn(2, 7, 3, 4)
    chunked = one_at_a_time.cost_fn({"pixels": np.stack([pixels[:3], pixels[3:6]])}, chunks, np.array([0, 1]))
    torch.testing.assert_close(chunked(plans), cost(plans))


def test_a_compiled_planning_cost_gives_the_eager_costs(trained):
    model = load_world_model(trained[0]).eval().requires_grad_(False)
    pixels = open_dataset(model).tensors["pixels"][:8].numpy()
    observed, chunks, index = {"pixels": np.stack([pixels[:3], pixels[3:6]])}, torch.zeros(2, 2, 4), np.array([0, 1])
    eager = LatentObjective(model, goals(pixels[:2]), torch.device("cpu")).cost_fn(observed, chunks, index)
    compiled = LatentObjective(model, goals(pixels[:2]), torch.device("cpu"), compile=True).cost_fn(observed, chunks, index)
    plans = torch.randn(2, 7, 2, 4, generator=torch.Generator().manual_seed(0))  # 2 imagined steps: a short compile
    assert torch.allclose(compiled(plans), eager(plans), rtol=1e-4, atol=1e-5)
    # python -m leworld.bench planning times the same objective compiled (its stage in the GPU results run)
    spec = OmegaConf.create({"context": 3, "horizon": 2, "repeats": 1, "cem": {"samples": 7, "elites": 2, "iterations": 2},
                             "cpu_rows_per_call": 8})
    solve = PlanningSolve(model, spec, {}, 2, torch.device("cpu"))
    timed = solve.time([("reference", False), ("fast", True)])
    assert all(seconds > 0 and gflop > 0 for seconds, gflop in timed.values()) and solve.timed_as == "whole"
    assert timed["fast", True][1] < timed["reference", False][1]  # the fast rollout's fewer FLOPs


def test_tasks_stay_inside_held_out_episodes(trained):
    model = load_world_model(trained[0])
    dataset = open_dataset(model)
    held_out = np.asarray(model.data.held_out)
    rows = sample_tasks(dataset, held_out, 200, 10, seed=3)
    episode = np.searchsorted(dataset.episode_starts, rows, side="right") - 1
    assert np.isin(episode, held_out).all()
    assert (rows + 10 < dataset.episode_starts[episode] + dataset.episode_lengths[episode]).all()
    assert np.array_equal(rows, sample_tasks(dataset, held_out, 200, 10, seed=3))


def one_line_error(done) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    return done.stderr.strip().splitlines()[-1]


def eval_error(capsys, *args) -> str:
    """The one error line of leworld.eval run in this process (quicker than a new interpreter)."""
    with pytest.raises(SystemExit) as stop:
        run_main("eval", run_eval, list(args))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_input(trained, tmp_path, capsys):
    assert "does not exist" in one_line_error(run("eval", f"ckpt={tmp_path / 'nothing'}"))
    assert "is a tworoom world model, not pusht" in one_line_error(run("eval", f"ckpt={trained[0]}", "env=pusht"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((trained[0] / "checkpoint.safetensors").read_bytes()[:1000])
    assert "truncated or corrupt" in one_line_error(run("eval", f"ckpt={broken}"))
    assert "there is no planner=newton" in one_line_error(run("eval", f"ckpt={trained[0]}", "planner=newton"))
    assert "elites" in one_line_error(run("eval", f"ckpt={trained[0]}", "planner.elites=1000", f"out_dir={tmp_path / 'x'}"))
    assert "protocol.episodes=0" in one_line_error(run("eval", f"ckpt={trained[0]}", "protocol.episodes=0"))
    for planner, message in {("planner=gradient", "planner.lr=nan"): "planner.lr=nan: it must be a number > 0",
                             ("planner=cem", "planner.iterations=-1"): "planner.iterations=-1: it must be an integer >= 1",
                             ("planner=mppi", "planner.temperature=-5"): "planner.temperature=-5",
                             ("planner=mppi", "planner.min_std=3"): "min_std <= max_std"}.items():
        assert message in eval_error(capsys, f"ckpt={trained[0]}", *planner, f"out_dir={tmp_path / 'x'}")
    (tmp_path / "file").write_text("x")  # an out_dir that cannot be made fails before any planning
    assert "cannot create out_dir" in one_line_error(run("eval", f"ckpt={trained[0]}", f"out_dir={tmp_path / 'file' / 'e'}"))
    assert not (tmp_path / "x").exists()


def test_the_oracle_plans_with_the_simulator(trained, data_path, tmp_path):
    """model=oracle: the same planner and protocol with plans scored in the simulator. On TwoRoom,
    whose goals are 10 steps of walking away, it reaches what random actions do not."""
    out = tmp_path / "oracle"
    done = run("eval", "model=oracle", "env=tworoom", "env.kwargs.image_size=32", f"data_path={data_path}",
               "model.frameskip=2", *SMALL, "protocol.budget=16", f"out_dir={out}", "protocol.videos=0")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    dataset = EpisodeDataset.open(data_path)
    check_episodes(report["episodes"]["planner"], dataset, budget=16)
    oracle, floor = report["summary"]["planner"], report["summary"]["random"]
    assert oracle["success_rate"] == 1.0 and floor["success_rate"] < 1.0
    assert report["settings"]["model"] == "oracle" and "start_success_rate" in oracle
    # the same tasks as a default training run's evaluation: its held-out episodes
    episode = np.searchsorted(dataset.episode_starts, [r["dataset_row"] for r in report["episodes"]["planner"]],
                              side="right") - 1
    assert np.isin(episode, dataset.split(0.1, 0)[1]).all()
    assert "needs env=" in one_line_error(run("eval", "model=oracle"))
    assert "model=oracle only" in one_line_error(run("eval", "model=lewm_gpu", f"ckpt={trained[0]}"))


def test_the_simulator_objective_scores_the_state_a_plan_reaches(data_path):
    from leworld.codec import ActionCodec
    from leworld.models import EnvSpec
    from leworld.planning import Oracle

    dataset = EpisodeDataset.open(data_path)
    codec = ActionCodec((0.1, 0.0), (0.5, 0.5), (-1.0, -1.0), (1.0, 1.0), 2)
    goals = dataset.tensors["state"][[30, 31]].double().numpy()
    oracle = Oracle(codec, EnvSpec("tworoom", {"image_size": 32}), None)
    objective = SimulatorObjective(oracle, Goals(None, goals, None, None))
    starts = dataset.tensors["state"][[0, 1]].double().numpy()
    cost = objective.cost_fn({"state": starts[:, None]}, None, np.array([0, 1]))
    plans = torch.randn(2, 3, 2, 4)
    env = envs.make("tworoom", image_size=32)
    for b in range(2):
        env.reset(options={"state": starts[b]})
        for action in codec.to_env(plans[b, 1]):  # executed as the MPC loop would
            *_, info = env.step(action)
        assert cost(plans)[b, 1].item() == pytest.approx(env.distance(info["state"], goals[b]), rel=1e-5)


def test_cube_collects_trains_probes_and_plans_from_the_command_line(tmp_path):
    """The 3-D task on the whole path: train collects its missing dataset (4-D actions), probes the
    cube's pose as tilt and yaw, and eval plans with the checkpoint and with the simulator."""
    run_dir, probe = train_probe_and_plan(tmp_path, "cube", SMALL)
    assert {"cube_z", "cube_tilt", "cube_yaw4.cos"} <= set(probe["r2"]["trained"])
    # each task says how far it moves the cube, start to goal, and success is split by it
    report = json.loads((tmp_path / "ckpt" / "eval.json").read_text())
    state = EpisodeDataset.open(tmp_path / "cube").tensors["state"].double().numpy()
    for r in report["episodes"]["planner"]:
        start, goal = state[r["dataset_row"], 5:8], state[r["dataset_row"] + 10, 5:8]
        assert r["object_moved"] == pytest.approx(np.linalg.norm(goal - start))
    split = report["summary"]["planner"]["by_object_moved"]
    assert split["object"] == ["cube_x", "cube_y", "cube_z"] and sum(split["episodes"]) == 5
    assert all(0 <= won <= count for won, count in zip(split["successes"], split["episodes"]))
    assert load_world_model(run_dir).codec.block_dim == 4 * 2  # 4-D actions, frameskip 2


def test_imagining_with_the_simulator_scores_the_frame_a_plan_ends_on(trained):
    """imagine=simulator (EncodedSimulatorObjective): a plan's cost is the model's distance from the
    encoded frame the simulator ends on to the goal's latent; the recorded actions that reached the
    goal frame cost (almost) nothing, where the model's own imagination of them does not."""
    from leworld.planning import EncodedSimulatorObjective

    model = load_world_model(trained[0])
    dataset = open_dataset(model)
    codec, offset = model.codec, 2 * model.frameskip
    rows = np.array([dataset.episode_starts[e] + 3 for e in model.data.held_out[:2]])
    states = dataset.tensors["state"].double().numpy()
    pixels = dataset.tensors["pixels"].numpy()
    targets = Goals(pixels[rows + offset], states[rows + offset], None, None)
    simulated = EncodedSimulatorObjective(model, targets, torch.device("cpu"))
    observed = {"pixels": pixels[rows][:, None], "state": states[rows][:, None]}
    cost = simulated.cost_fn(observed, None, np.array([0, 1]))
    recorded = codec.to_chunks(dataset.tensors["action"][torch.as_tensor(rows)[:, None] + torch.arange(offset)].float())
    plans = torch.cat([recorded[:, None], torch.randn(2, 3, 2, codec.block_dim)], dim=1)  # (2, 4, H, fs·A)
    costs = cost(plans)
    assert costs.shape == (2, 4) and (costs[:, 0] < 1e-4 * costs[:, 1:].min()).all()
    env = envs.make("tworoom", image_size=32)
    for b in range(2):  # a random plan: what its end looks like to the model
        env.reset(options={"state": states[rows[b]]})
        for action in codec.to_env(plans[b, 2]):
            frame, *_ = env.step(action)
        latent = simulated.encode(frame[None, None])[0, 0]
        assert costs[b, 2].item() == pytest.approx(model.distance(latent, simulated.goals[b]).item(), rel=1e-4)
    imagined = LatentObjective(model, targets, torch.device("cpu")).cost_fn(observed, None, np.array([0, 1]))
    assert (imagined(recorded[:, None]) > 1e3 * costs[:, 0:1]).all()


def test_eval_can_imagine_with_the_simulator(trained, tmp_path):
    out = tmp_path / "simulated"
    done = run("eval", f"ckpt={trained[0]}", *SMALL, "imagine=simulator", f"out_dir={out}", "protocol.videos=0",
               "protocol.random_baseline=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imagine=simulator" in done.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"]["imagine"] == "simulator" and report["settings"]["untrained"] is False
    check_episodes(report["episodes"]["planner"], open_dataset(load_world_model(trained[0])))
    # the same encoder untrained scores the simulated plans: its own costs, the same tasks
    untrained = tmp_path / "untrained"
    done = run("eval", f"ckpt={trained[0]}", *SMALL, "imagine=simulator", "untrained=true", f"out_dir={untrained}",
               "protocol.videos=0", "protocol.random_baseline=false")
    assert done.returncode == 0, done.stderr[-3000:]
    other = json.loads((untrained / "eval.json").read_text())
    assert other["settings"]["untrained"] is True
    rows = lambda r: [e["dataset_row"] for e in r["episodes"]["planner"]]  # noqa: E731
    assert rows(other) == rows(report)
    assert [e["final_state"] for e in other["episodes"]["planner"]] != [e["final_state"] for e in report["episodes"]["planner"]]
    for wrong in (["untrained=true"], ["untrained=true", "imagine=simulator", "planner=prior"]):
        assert "untrained=true" in one_line_error(run("eval", f"ckpt={trained[0]}", *wrong))
