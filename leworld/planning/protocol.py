"""The planning protocol of LeWM and DINO-WM (configs/protocol/default.yaml), run in batches: each
task starts at a random state of a held-out episode of the model's dataset, its goal is the frame
`goal_offset` env steps later in that episode, and the planner has `budget` env steps to reach it
under MPC (planners/mpc.py). Plans are searched in the model's own action space (the codec in its
checkpoint), whatever dataset supplies the tasks."""

import statistics

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import envs
from leworld import LeworldError
from leworld.codec import ActionCodec
from leworld.dataset import EpisodeDataset
from leworld.planning.anatomy import by_object_moved, explain, failure_summary, recorded_plans
from leworld.planning.objectives import Goals, LatentObjective
from planners import PLANNERS, Bounds
from planners.mpc import run_mpc


def check_protocol(cfg: DictConfig) -> None:
    """What the protocol's values (checked one by one in leworld/settings.py) must satisfy together."""
    protocol = cfg.protocol
    if protocol.receding_horizon is not None and not 0 < protocol.receding_horizon <= protocol.horizon:
        raise LeworldError(f"protocol.receding_horizon={protocol.receding_horizon} must be between 1 and "
                           f"protocol.horizon={protocol.horizon} (or null: the whole plan)")


def make_planner(cfg: DictConfig, codec: ActionCodec, seed: int, device: torch.device):
    """The planner of cfg (configs/planner/*.yaml), searching chunks inside the env's bounds."""
    settings = {k: v for k, v in OmegaConf.to_container(cfg).items()
                if k not in ("name", "receding_horizon", "shrink_horizon")}
    if cfg.name not in PLANNERS:
        raise LeworldError(f"there is no planner={cfg.name}; choose one of: {', '.join(PLANNERS)}")
    try:
        return PLANNERS[cfg.name](codec.block_dim, bounds=Bounds(*codec.bounds(device)), seed=seed, device=device,
                                  **settings)
    except (TypeError, ValueError) as err:
        raise LeworldError(f"planner={cfg.name}: {err}") from None


def chunks_per_solve(planner_cfg: DictConfig, protocol: DictConfig) -> int:
    """Chunks executed before planning again: the protocol's receding_horizon where set, else the
    planner's own (the policy prior's 1: a closed-loop controller, asked again after every chunk),
    else the whole plan, as LeWM does."""
    return protocol.receding_horizon or planner_cfg.get("receding_horizon") or protocol.horizon


def goal_steps(planner_cfg: DictConfig, protocol: DictConfig) -> int | None:
    """The env steps in which the goal is due where each solve plans only the chunks left until then
    (protocol.shrink_horizon, else the planner's own: the policy prior's), else None."""
    shrink = protocol.get("shrink_horizon")
    if shrink is None:
        shrink = planner_cfg.get("shrink_horizon", False)
    return protocol.goal_offset if shrink else None


def task_episodes(model, dataset: EpisodeDataset) -> tuple[np.ndarray, str]:
    """The episodes tasks are drawn from: the held-out ones of the model's own dataset, or every
    episode of another dataset (which the model never trained on). -> (episodes, a description)."""
    if dataset.fingerprint() == model.data.fingerprint:
        return np.asarray(model.data.held_out), "held-out"
    return np.arange(dataset.num_episodes), "(another dataset than the model's: all)"


def sample_tasks(dataset: EpisodeDataset, episodes: np.ndarray, count: int, offset: int, seed: int) -> np.ndarray:
    """Dataset rows of `count` start frames: a random episode (with replacement) and a random frame
    in it with the goal `offset` steps later still inside the episode."""
    eligible = episodes[dataset.episode_lengths[episodes] > offset]
    if len(eligible) == 0:
        raise LeworldError(f"no held-out episode of {dataset.path} is longer than protocol.goal_offset={offset} steps")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(eligible, count)
    return dataset.episode_starts[chosen] + rng.integers(0, dataset.episode_lengths[chosen] - offset)


def run_protocol(model, dataset: EpisodeDataset, rows: np.ndarray, planner_cfg: DictConfig, protocol: DictConfig,
                 seed: int, device: torch.device, record: int = 0, objective=LatentObjective,
                 anatomy: bool = True) -> tuple[list[dict], list[float], list]:
    """Plan from the given start rows, `protocol.batch` environments at a time. model: a world model
    (or the oracle, with objective=SimulatorObjective); objective: what the planner minimises, made
    as objective(model, goals, device, compile) for each batch; anatomy: class each failure
    (leworld/planning/anatomy.py) where the goal is one plan away.
    -> a row per episode, the seconds of every solve, and of the first `record` episodes what was
    seen: every frame ("frames"), the first plan ("first_plan", (H, fs·A)) and the frames and states
    before it and after each of its chunks ("first_frames", "first_states")."""
    planner = make_planner(planner_cfg, model.codec, seed, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    state, pixels = dataset.tensors["state"], dataset.tensors["pixels"]
    has_proprio = "proprio" in dataset.tensors.keys()
    results, solve_seconds, seen = [], [], []
    for first in range(0, len(rows), protocol.batch):
        batch_rows = rows[first:first + protocol.batch]
        goal_rows = torch.as_tensor(batch_rows + protocol.goal_offset)
        goals = state[goal_rows].numpy().astype(np.float64)
        batch = [envs.make(model.env.name, **model.env.kwargs) for _ in batch_rows]
        starts = state[torch.as_tensor(batch_rows)].numpy().astype(np.float64)
        for env, start, goal in zip(batch, starts, goals):
            env.reset(options={"state": start, "goal": goal})
        targets = Goals(pixels[goal_rows].numpy(), goals, dataset.tensors["proprio"][goal_rows].numpy() if has_proprio
                        else None, batch[0].proprio if has_proprio else None)
        costs = objective(model, targets, device, protocol.get("compile", False),
                          rows_per_call=rows_per_call(protocol, device))
        recorded = recorded_plans(dataset.tensors["action"], batch_rows, model.codec, protocol.horizon,
                                  protocol.goal_offset) if anatomy else None
        result = run_mpc(batch, costs, planner, model.codec.to_env, horizon=protocol.horizon,
                         receding_horizon=chunks_per_solve(planner_cfg, protocol), budget=protocol.budget,
                         frameskip=model.frameskip, history=model.history, record=first < record,
                         synchronize=synchronize, compare=recorded,
                         goal_steps=goal_steps(planner_cfg, protocol))
        for env in batch:
            env.close()
        episodes = [{"episode": first + i, "seed": seed, "dataset_row": int(row), "success": bool(result.success[i]),
                     "steps": int(result.steps[i]), "start_success": bool(batch[i].success(starts[i], goals[i])),
                     "final_distance": batch[i].distance(result.final_state[i], goals[i]),
                     "final_state": result.final_state[i].tolist(),
                     **object_moved(batch[i], starts[i], goals[i])} for i, row in enumerate(batch_rows)]
        if recorded is not None:
            explain(episodes, result, costs, model.env, starts, goals, recorded, model.codec, np.arange(len(batch)))
        results += episodes
        solve_seconds += result.solve_seconds
        seen += [{"frames": result.frames[i], "first_plan": result.first_plan[i].cpu(),
                  "first_frames": result.first_frames[i], "first_states": result.first_states[i]}
                 for i in range(len(result.frames))]
    return results, solve_seconds, seen[:record]


def object_moved(env, start: np.ndarray, goal: np.ndarray) -> dict:
    """How far a task asks to move the env's object (its `object_dims`), start to goal: {} without one."""
    dims = list(env.object_dims)
    return {"object_moved": float(np.linalg.norm(goal[dims] - start[dims]))} if dims else {}


def rows_per_call(protocol: DictConfig, device: torch.device) -> int | None:
    """How many (environment, plan) rows a cost call takes at a time: protocol.cpu_rows_per_call on
    a CPU (whose caches it keeps intermediates in), all of them on a GPU (whose width they fill)."""
    return protocol.get("cpu_rows_per_call") if device.type == "cpu" else None


def summary(results: list[dict], solve_seconds: list[float], object_names: list[str] | None = None) -> dict:
    """The figures of one set of episodes; object_names: the env's `object_dims`' state names, for
    the split of success by how far the tasks move that object."""
    success = np.array([r["success"] for r in results], dtype=float)
    return {"success_rate": float(success.mean()),
            "standard_error": float(success.std(ddof=1) / np.sqrt(len(success))) if len(success) > 1 else 0.0,
            "median_final_distance": float(np.median([r["final_distance"] for r in results])),
            "start_success_rate": float(np.mean([r["start_success"] for r in results])),
            "episodes": len(results), "solves": len(solve_seconds),
            "median_solve_seconds": statistics.median(solve_seconds) if solve_seconds else 0.0} \
        | failure_summary(results) | by_object_moved(results, object_names)

