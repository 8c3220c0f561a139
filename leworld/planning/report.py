"""One evaluation under the protocol, reported: the planner's success rate with its standard error,
the same tasks with random actions (the floor), the planning time per solve, eval.json (one row per
episode, and the settings) and GIFs of a few episodes with the goal beside them."""

import json
from pathlib import Path

import numpy as np
import torch
from einops import rearrange, repeat
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import envs
from leworld import LeworldError
from leworld.dataset import EpisodeDataset
from leworld.planning.objectives import LatentObjective
from leworld.planning.protocol import chunks_per_solve, goal_steps, run_protocol, sample_tasks, summary, task_episodes
from leworld.plots import plot_eval
from leworld.runtime import autocast


def evaluate(model, dataset: EpisodeDataset, planner_cfg: DictConfig, protocol: DictConfig, seed: int,
             device: torch.device, out_dir: Path, settings: dict, objective=LatentObjective,
             oracle: dict | None = None, decoder=None) -> dict:
    """Plan under the protocol (and with random actions, the floor), print the summary and write
    eval.json and videos into out_dir, which must not exist yet: it is made first, so that an
    unwritable place fails before any planning (and is removed again if planning fails).
    settings: what eval.json records of where the model came from. objective: as run_protocol's.
    oracle: the summary of the oracle on the same tasks, drawn beside this model in eval.png;
    decoder: a pixel decoder of the model's latents, for videos of what it imagined."""
    if out_dir.exists():
        raise LeworldError(f"out_dir={out_dir} exists; results are never overwritten: pass another out_dir")
    try:
        out_dir.mkdir(parents=True)
    except OSError as err:
        raise LeworldError(f"cannot create out_dir={out_dir} ({err.strerror or err}); pass a writable out_dir") from None
    try:
        return _evaluate_into(model, dataset, planner_cfg, protocol, seed, device, out_dir, settings, objective, oracle,
                              decoder)
    except BaseException:
        if not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def _evaluate_into(model, dataset, planner_cfg, protocol, seed, device, out_dir: Path, settings: dict, objective,
                   oracle: dict | None, decoder) -> dict:
    episodes, which = task_episodes(model, dataset)
    rows = sample_tasks(dataset, episodes, protocol.episodes, protocol.goal_offset, seed)
    receding = chunks_per_solve(planner_cfg, protocol)
    print(f"{model.env.name}: {protocol.episodes} episodes from {len(episodes)} {which} episodes of {dataset.path}; "
          f"goal {protocol.goal_offset} steps ahead, budget {protocol.budget} steps; planner {planner_cfg.name}, "
          f"horizon {protocol.horizon} chunks of {model.frameskip} steps, replanning every {receding}"
          f"{', each plan to the step the goal is due' if goal_steps(planner_cfg, protocol) else ''}")
    results, solve_seconds, seen = run_protocol(model, dataset, rows, planner_cfg, protocol, seed, device,
                                                record=protocol.videos, objective=objective)
    env_class = envs.ENVS[model.env.name]
    object_names = [env_class.state_names[i] for i in env_class.object_dims]
    report = {"planner": summary(results, solve_seconds, object_names)}
    print(f"{planner_cfg.name}: success {100 * report['planner']['success_rate']:.1f}% ± "
          f"{100 * report['planner']['standard_error']:.1f}% over {len(results)} episodes, median final distance "
          f"{report['planner']['median_final_distance']:.3g}; median planning time "
          f"{report['planner']['median_solve_seconds']:.2f} s per solve of up to {protocol.batch} environments; "
          f"{100 * report['planner']['start_success_rate']:.0f}% of the starts already met their goal")
    print_anatomy(report["planner"])
    print_by_object_moved(report["planner"])
    rows_out = {"planner": results}
    if protocol.random_baseline:
        floor, _, _ = run_protocol(model, dataset, rows, OmegaConf.create({"name": "random_actions"}), protocol, seed, device,
                                   objective=objective, anatomy=False)
        report["random"] = summary(floor, [], object_names)
        rows_out["random"] = floor
        print(f"random actions: success {100 * report['random']['success_rate']:.1f}% ± "
              f"{100 * report['random']['standard_error']:.1f}%, median final distance "
              f"{report['random']['median_final_distance']:.3g}")
    goal_frames = dataset.tensors["pixels"][torch.as_tensor(rows[:protocol.videos] + protocol.goal_offset)].numpy()
    videos = save_videos(seen, goal_frames, out_dir, protocol.videos)
    if decoder is not None:
        env = envs.make(model.env.name, **model.env.kwargs)  # its proprio(state), for models that read it
        videos += imagined_videos(model, decoder, seen, goal_frames, out_dir,
                                  env.proprio if "proprio" in dataset.tensors.keys() else None, device)
        env.close()
    settings = settings | {"planner": OmegaConf.to_container(planner_cfg), "protocol": OmegaConf.to_container(protocol),
                           "seed": seed, "env": model.env.name, "dataset": str(dataset.path), "device": str(device),
                           "action_codec": model.codec.to_dict()}
    (out_dir / "eval.json").write_text(json.dumps({"settings": settings, "summary": report, "episodes": rows_out,
                                                   "videos": videos}, indent=1))
    pictures = [str(plot_eval(report, out_dir / "eval.png", oracle)), *videos]
    print(f"saved {out_dir / 'eval.json'}, {out_dir / 'eval.png'} and {len(videos)} videos")
    return report | {"out_dir": str(out_dir), "pictures": pictures}


def print_anatomy(summary: dict) -> None:
    """One line of why the failures failed (leworld/planning/anatomy.py), one of the medians behind it."""
    if "failures" not in summary:
        return
    classes, medians = summary["failures"], summary["failed_medians"]
    print(f"failures: {sum(classes.values())} of {summary['episodes']}: "
          + ", ".join(f"{name} {count}" for name, count in classes.items())
          + " (search: the recorded actions cost less than the chosen plan; model: the chosen plan cost less and failed)")
    if medians:
        line = (f"  failed episodes, medians: first solve's cost of the chosen plan {medians['plan_cost']:.3g}, "
                f"of the recorded actions {medians['recorded_cost']:.3g}")
        if "open_loop_error" in medians:
            line += (f"; the chosen plan's end: achieved cost {medians['achieved_cost']:.3g}, open-loop error "
                     f"{medians['open_loop_error']:.3g} (nothing changes: {medians['moved']:.3g})")
        print(line)


def print_by_object_moved(summary: dict) -> None:
    """One line of success in thirds of the tasks by how far each moves the env's object (anatomy.py)."""
    if "by_object_moved" not in summary:
        return
    split = summary["by_object_moved"]
    low, high = split["edges"]
    thirds = [f"under {low:.3g}", f"{low:.3g} to {high:.3g}", f"{high:.3g} or more"]
    print(f"  success by how far the task moves {' / '.join(split['object'])} (thirds of the tasks): "
          + ", ".join(f"{third}: {won} of {count}"
                      for third, won, count in zip(thirds, split["successes"], split["episodes"])))


def write_gif(rows: list[list[np.ndarray]], path: Path, duration: int = 100) -> str:
    """One GIF frame per row of equal frames (H, W, 3) uint8, side by side with a 1-px gap, scaled up
    to at least 192 px."""
    size = rows[0][0].shape[0]
    scale, gap = max(1, 192 // size), np.zeros((size, 1, 3), np.uint8)
    pictures = [Image.fromarray(repeat(np.concatenate([x for frame in row for x in (frame, gap)][:-1], axis=1),
                                       "h w c -> (h s) (w t) c", s=scale, t=scale)) for row in rows]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=duration, loop=0)
    return str(path)


def save_videos(seen: list[dict], goal_frames: np.ndarray, folder: Path, count: int) -> list[str]:
    """GIFs of the first `count` episodes: each frame beside the goal."""
    return [write_gif([[frame, goal_frames[i]] for frame in episode["frames"]], folder / f"episode_{i}.gif")
            for i, episode in enumerate(seen[:count])]


@torch.no_grad()
def imagined_videos(model, decoder, seen: list[dict], goal_frames: np.ndarray, folder: Path, proprio_of,
                    device: torch.device) -> list[str]:
    """GIFs of what the model imagined for each recorded episode's first plan, decoded (a pixel
    decoder of its latents, leworld/decode.py): per chunk, what happened, what the model imagined,
    and the goal. Where the first two part, the model was wrong. proprio_of: the env's state ->
    proprio, for models that read it (else None)."""
    paths = []
    for i, episode in enumerate(seen):
        start = torch.from_numpy(episode["first_frames"][0])
        proprio = None if proprio_of is None else torch.as_tensor(
            proprio_of(episode["first_states"][0]), dtype=torch.float32, device=device)[None, None]
        with autocast(device):
            z = model.encode(rearrange(start, "h w c -> 1 1 c h w").to(device), proprio)  # (1, 1, D)
            imagined = torch.cat([z, model.rollout(z, episode["first_plan"][None].to(device))], 1)[0]
        happened = list(episode["first_frames"]) + [np.zeros_like(goal_frames[i])] * len(imagined)  # black once it stopped
        rows = [[real, drawn, goal_frames[i]] for real, drawn in zip(happened, decoder.draw(imagined))]
        paths.append(write_gif(rows, folder / f"imagined_{i}.gif", duration=400))
    return paths
