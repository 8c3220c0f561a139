"""Failure anatomy: why the planner failed where it failed.

Each task's goal is a frame the dataset reached `goal_offset` steps after the start, so the
dataset's own actions from the start are a plan that reaches it. The first solve's cost function
scores that recorded plan beside the plan the planner chose, and a failed episode is classed:

- "search": the recorded actions cost less than the chosen plan: the model knew a better plan and
  the planner did not find it;
- "model": the chosen plan cost no more than the recorded actions, yet failed: the model was wrong
  about it (the chosen plan's open-loop prediction against what the simulator showed says how wrong);
- "recorded actions miss": replayed in the simulator, the recorded actions do not reach the goal
  either (the simulator is not deterministic enough, or the success test is stricter than the data),
  so the task says nothing of the model or the planner.

Only the first solve is classed: later ones start where the first plan left the environment.
"""

import numpy as np
import torch

import envs
from leworld.codec import ActionCodec

CLASSES = ("search", "model", "recorded actions miss")


def recorded_plans(actions: torch.Tensor, rows: np.ndarray, codec: ActionCodec, horizon: int,
                   goal_offset: int) -> torch.Tensor | None:
    """The dataset's actions (N, A) from each start row to its goal as one plan each (b, 1, H, fs·A);
    None unless the goal is exactly one plan of `horizon` chunks away (then there is no such plan)."""
    if goal_offset != horizon * codec.frameskip:
        return None
    raw = actions[torch.as_tensor(rows)[:, None] + torch.arange(goal_offset)]  # (b, goal_offset, A)
    return codec.to_chunks(raw.float())[:, None]


def replay_reaches(env_name: str, env_kwargs: dict, starts: np.ndarray, goals: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Whether stepping each env from its start (b, S) through raw actions (b, T, A) reaches its goal (b, S). -> (b,) bool"""
    env, reached = envs.make(env_name, **env_kwargs), []
    for start, goal, actions in zip(starts, goals, raw):
        env.reset(options={"state": start, "goal": goal})
        success = False
        for action in actions:
            success |= bool(env.step(action)[4]["success"])
            if success:
                break
        reached.append(success)
    env.close()
    return np.array(reached)


def classify(success: np.ndarray, chosen_cost: np.ndarray, recorded_cost: np.ndarray, reaches: np.ndarray) -> list:
    """Each episode's class: None where it succeeded, else one of CLASSES."""
    return [None if done else CLASSES[2] if not reached else CLASSES[0] if recorded < chosen else CLASSES[1]
            for done, chosen, recorded, reached in zip(success, chosen_cost, recorded_cost, reaches)]


def failure_summary(results: list[dict]) -> dict:
    """The failures' classes and, over failed episodes, the medians of the first solve's costs and of
    the chosen plan's open-loop error at its last chunk. {} where nothing was classed."""
    if not any("failure" in r for r in results):
        return {}
    failed = [r for r in results if r["failure"]]
    medians = {key: float(np.median([r[key] for r in failed]))
               for key in ("plan_cost", "recorded_cost", "achieved_cost") if failed and all(key in r for r in failed)}
    if failed and all("open_loop_error" in r for r in failed):
        medians |= {"open_loop_error": float(np.median([r["open_loop_error"][-1] for r in failed])),
                    "moved": float(np.median([r["moved"][-1] for r in failed]))}
    return {"failures": {name: sum(r.get("failure") == name for r in results) for name in CLASSES},
            "failed_medians": medians}


def by_object_moved(results: list[dict], names: list[str] | None) -> dict:
    """Success in thirds of the tasks, ordered by how far each asks to move the env's object (its
    `object_dims`, PushT's block; the rows' "object_moved", start to goal): whether a planner fails
    the tasks that need a push, or all alike. The edges are these tasks' own thirds, so two evals
    compare where they planned the same tasks. {} where the env names no object or under 3 tasks."""
    if not names or len(results) < 3 or not all("object_moved" in r for r in results):
        return {}
    moved = np.array([r["object_moved"] for r in results])
    success = np.array([r["success"] for r in results])
    edges = np.quantile(moved, [1 / 3, 2 / 3])
    third = np.searchsorted(edges, moved, side="right")  # (N,) in 0..2: under the first edge, between, above
    return {"by_object_moved": {"object": list(names), "edges": edges.tolist(),
                                "episodes": [int((third == k).sum()) for k in range(3)],
                                "successes": [int(success[third == k].sum()) for k in range(3)]}}


def explain(rows: list[dict], result, objective, env, starts: np.ndarray, goals: np.ndarray, recorded: torch.Tensor,
            codec: ActionCodec, index: np.ndarray) -> None:
    """Add each episode's anatomy to its row: the first solve's cost of the chosen plan and of the
    recorded actions (by run_mpc's `compare`), whether those reach the goal when replayed, the
    class of a failure, and where the objective can say it (a world model's), the chosen plan's
    open-loop error per chunk beside how far the latent moved and the cost it achieved."""
    chosen, cost_recorded = result.first_costs[:, 0].numpy(), result.first_costs[:, 1].numpy()
    reaches = replay_reaches(env.name, env.kwargs, starts, goals, codec.to_env(recorded[:, 0]))
    for row, failure, *values in zip(rows, classify(result.success, chosen, cost_recorded, reaches), chosen,
                                     cost_recorded, reaches):
        row |= {"failure": failure, "plan_cost": float(values[0]), "recorded_cost": float(values[1]),
                "recorded_reaches": bool(values[2])}
    chunks = max(len(frames) for frames in result.first_frames) - 1  # of the first plan, stepped whole
    whole = [i for i, frames in enumerate(result.first_frames) if len(frames) == chunks + 1]  # (not stopped by success)
    if not hasattr(objective, "open_loop") or not chunks:
        return
    observed = {"pixels": np.stack([result.first_frames[i][:chunks + 1] for i in whole]),
                "state": np.stack([result.first_states[i][:chunks + 1] for i in whole])}
    seen = objective.open_loop(observed, result.first_plan[whole, :chunks], index[whole])
    for j, i in enumerate(whole):
        rows[i] |= {"open_loop_error": seen["error"][j].tolist(), "moved": seen["moved"][j].tolist(),
                    "achieved_cost": float(seen["achieved"][j])}
