"""Plan with a trained world model:  python -m leworld.eval ckpt=<run folder> [planner=cem] [key=value ...]

The protocol of LeWM and DINO-WM (configs/protocol/default.yaml): each episode starts at a random
state of a held-out episode of the model's dataset, its goal is the frame `goal_offset` env steps
later in that episode, and the planner has `budget` env steps to reach it under MPC. Environments
are planned together in batches. Plans are searched in the model's own action space (the codec in
its checkpoint), whatever dataset supplies the tasks. Prints the success rate with its standard
error, the same episodes with random actions (the floor) and the planning time per solve; writes
eval.json (one row per episode, and the settings) and GIFs of a few episodes with the goal beside them.
"""

import datetime
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from einops import rearrange, repeat
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import envs
from leworld import LeworldError, settings
from leworld.checkpoint import resolve_path
from leworld.data import ActionCodec, EpisodeDataset
from leworld.models import DataRecord, EnvSpec, WorldModel, load_world_model, open_dataset
from leworld.runtime import autocast, check_values, pick_device, run_main
from planners import PLANNERS, Bounds
from planners.mpc import run_mpc


class LatentObjective:
    """The planning cost of a world model: squared distance between the last imagined latent and
    the goal's. Goals are encoded once when it is made, the observed frames once per solve.
    goal_proprio (B, Q) and proprio_of (an env's state (S,) -> its proprioception (Q,)) are for
    world models that read proprioception; the others ignore it."""

    def __init__(self, model, goal_pixels: np.ndarray, device: torch.device, goal_proprio: np.ndarray | None = None,
                 proprio_of: Callable[[np.ndarray], np.ndarray] | None = None, compile: bool = False):
        """compile: torch.compile the cost (on CUDA with CUDA graphs: a planner's shapes do not change)."""
        self.model, self.device, self.proprio_of = model, device, proprio_of
        self.plan_cost = model.plan_cost
        if compile:
            compiled = torch.compile(model.plan_cost, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)
            # CUDA graphs write each call's output into the same memory: a planner may keep costs longer
            self.plan_cost = lambda *args: compiled(*args).clone()
        self.goals = self.encode(goal_pixels[:, None], None if goal_proprio is None else goal_proprio[:, None])[:, 0]

    @torch.no_grad()
    def encode(self, pixels: np.ndarray, proprio: np.ndarray | None = None) -> torch.Tensor:
        """uint8 frames (B, T, H, W, 3) and proprio (B, T, Q) -> latents (B, T, *L) in float32."""
        frames = rearrange(torch.from_numpy(pixels).to(self.device), "b t h w c -> b t c h w")
        if proprio is not None:
            proprio = torch.as_tensor(proprio, dtype=torch.float32, device=self.device)
        with autocast(self.device):
            return self.model.encode(frames, proprio).float()

    def cost_fn(self, observed: dict, chunks: torch.Tensor | None, index: np.ndarray):
        proprio = None if self.proprio_of is None else np.apply_along_axis(self.proprio_of, -1, observed["state"])
        context = self.encode(observed["pixels"], proprio)  # (b, T, *L)
        goal = self.goals[torch.as_tensor(index, device=self.device)]
        taken = None if chunks is None else chunks.to(self.device)

        def cost(plans: torch.Tensor) -> torch.Tensor:  # (b, S, H, fs·A) -> (b, S)
            with autocast(self.device):
                return self.plan_cost(context, goal, plans, taken).float()

        return cost


class SimulatorObjective:
    """The oracle's planning cost: each candidate plan simulated from the observed state in a copy
    of the environment (physics only, nothing drawn) and scored by the env's goal cost. Exact, and
    slow: it is the ceiling of what the planner and the protocol allow, not a model."""

    def __init__(self, env: EnvSpec, goals: np.ndarray, codec: ActionCodec):
        self.sim, self.goals, self.codec = envs.make(env.name, **env.kwargs), goals, codec

    def cost_fn(self, observed: dict, chunks: torch.Tensor | None, index: np.ndarray):
        starts, goals = observed["state"][:, -1], self.goals[index]  # (b, S), (b, S)

        def cost(plans: torch.Tensor) -> torch.Tensor:  # (b, S, H, fs·A) -> (b, S)
            raw = self.codec.to_env(plans)  # (b, S, H·fs, A): what the MPC loop would execute
            costs = [[self.sim.goal_cost(self.sim.simulate(start, actions), goal) for actions in samples]
                     for start, goal, samples in zip(starts, goals, raw)]
            return torch.tensor(costs, dtype=torch.float32, device=plans.device)

        return cost


@dataclass
class Oracle:
    """The simulator itself as the world model (model=oracle): what the planner and the protocol
    allow at best. It has what eval needs of a model: an action codec, an env and a data record."""

    codec: ActionCodec
    env: EnvSpec
    data: DataRecord
    history: int = 1

    @property
    def frameskip(self) -> int:
        return self.codec.frameskip

    @classmethod
    def of(cls, cfg: DictConfig) -> tuple["Oracle", EpisodeDataset]:
        """The oracle of cfg.env and its dataset (data_path, default model.data), with the action
        codec and held-out episodes a training run with model.val_fraction and model.split_seed makes."""
        if OmegaConf.select(cfg, "env.name") is None:
            raise LeworldError(f"model=oracle needs env=<{'|'.join(envs.ENVS)}>")
        env = EnvSpec(cfg.env.name, OmegaConf.to_container(cfg.env.kwargs, resolve=True))
        dataset = EpisodeDataset.open(cfg.data_path or cfg.model.data)
        if dataset.meta["env"]["name"] != env.name:
            raise LeworldError(f"{dataset.path} holds {dataset.meta['env']['name']} data, not {env.name}")
        space = envs.make(env.name, **env.kwargs).action_space
        codec = ActionCodec.from_stats(dataset.meta["stats"]["action"], space.low, space.high, cfg.model.frameskip)
        _, held_out = dataset.split(cfg.model.val_fraction, cfg.model.split_seed)
        data = DataRecord(str(dataset.path), dataset.meta["num_frames"], dataset.fingerprint(), tuple(map(int, held_out)))
        return cls(codec, env, data), dataset


def sample_tasks(dataset: EpisodeDataset, episodes: np.ndarray, count: int, offset: int, seed: int) -> np.ndarray:
    """Dataset rows of `count` start frames: a random episode (with replacement) and a random frame
    in it with the goal `offset` steps later still inside the episode."""
    eligible = episodes[dataset.episode_lengths[episodes] > offset]
    if len(eligible) == 0:
        raise LeworldError(f"no held-out episode of {dataset.path} is longer than protocol.goal_offset={offset} steps")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(eligible, count)
    return dataset.episode_starts[chosen] + rng.integers(0, dataset.episode_lengths[chosen] - offset)


def check_protocol(cfg: DictConfig) -> None:
    """What the protocol's values (checked one by one in leworld/settings.py) must satisfy together."""
    protocol = cfg.protocol
    if protocol.receding_horizon is not None and not 0 < protocol.receding_horizon <= protocol.horizon:
        raise LeworldError(f"protocol.receding_horizon={protocol.receding_horizon} must be between 1 and "
                           f"protocol.horizon={protocol.horizon} (or null: the whole plan)")


def make_planner(cfg: DictConfig, codec: ActionCodec, seed: int, device: torch.device):
    """The planner of cfg (configs/planner/*.yaml), searching chunks inside the env's bounds."""
    settings = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "name"}
    if cfg.name not in PLANNERS:
        raise LeworldError(f"there is no planner={cfg.name}; choose one of: {', '.join(PLANNERS)}")
    try:
        return PLANNERS[cfg.name](codec.block_dim, bounds=Bounds(*codec.bounds(device)), seed=seed, device=device,
                                  **settings)
    except (TypeError, ValueError) as err:
        raise LeworldError(f"planner={cfg.name}: {err}") from None


def evaluate(model: WorldModel, dataset: EpisodeDataset, rows: np.ndarray, planner_cfg: DictConfig,
             protocol: DictConfig, seed: int, device: torch.device, record: int = 0) -> tuple[list[dict], list[float], list]:
    """Run the protocol from the given start rows, `protocol.batch` environments at a time.
    -> a row per episode, the seconds of every solve, and the frames of the first `record` episodes."""
    planner = make_planner(planner_cfg, model.codec, seed, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    state, pixels = dataset.tensors["state"], dataset.tensors["pixels"]
    has_proprio = "proprio" in dataset.tensors.keys()
    results, solve_seconds, frames = [], [], []
    for first in range(0, len(rows), protocol.batch):
        batch_rows = rows[first:first + protocol.batch]
        goal_rows = torch.as_tensor(batch_rows + protocol.goal_offset)
        goals = state[goal_rows].numpy().astype(np.float64)
        batch = [envs.make(model.env.name, **model.env.kwargs) for _ in batch_rows]
        starts = state[torch.as_tensor(batch_rows)].numpy().astype(np.float64)
        for env, start, goal in zip(batch, starts, goals):
            env.reset(options={"state": start, "goal": goal})
        if isinstance(model, Oracle):
            objective = SimulatorObjective(model.env, goals, model.codec)
        else:
            objective = LatentObjective(model, pixels[goal_rows].numpy(), device,
                                        dataset.tensors["proprio"][goal_rows].numpy() if has_proprio else None,
                                        batch[0].proprio if has_proprio else None, protocol.get("compile", False))
        result = run_mpc(batch, objective, planner, model.codec.to_env, horizon=protocol.horizon,
                         receding_horizon=protocol.receding_horizon or protocol.horizon, budget=protocol.budget,
                         frameskip=model.frameskip, history=model.history, record=first < record,
                         synchronize=synchronize)
        for env in batch:
            env.close()
        for i, row in enumerate(batch_rows):
            results.append({"episode": first + i, "seed": seed, "dataset_row": int(row),
                            "success": bool(result.success[i]), "steps": int(result.steps[i]),
                            "start_success": bool(batch[i].success(starts[i], goals[i])),
                            "final_distance": batch[i].distance(result.final_state[i], goals[i]),
                            "final_state": result.final_state[i].tolist()})
        solve_seconds += result.solve_seconds
        frames += result.frames
    return results, solve_seconds, frames[:record]


def summary(results: list[dict], solve_seconds: list[float]) -> dict:
    success = np.array([r["success"] for r in results], dtype=float)
    return {"success_rate": float(success.mean()),
            "standard_error": float(success.std(ddof=1) / np.sqrt(len(success))) if len(success) > 1 else 0.0,
            "median_final_distance": float(np.median([r["final_distance"] for r in results])),
            "start_success_rate": float(np.mean([r["start_success"] for r in results])),
            "episodes": len(results), "solves": len(solve_seconds),
            "median_solve_seconds": statistics.median(solve_seconds) if solve_seconds else 0.0}


def save_videos(frames: list[list[np.ndarray]], goal_frames: np.ndarray, folder: Path, count: int) -> list[str]:
    """GIFs of the first `count` episodes: each frame beside the goal, scaled up to at least 192 px."""
    paths = []
    for i, episode in enumerate(frames[:count]):
        scale = max(1, 192 // goal_frames.shape[1])
        pictures = [np.concatenate([frame, np.zeros_like(frame[:, :1]), goal_frames[i]], axis=1) for frame in episode]
        images = [Image.fromarray(repeat(p, "h w c -> (h s) (w t) c", s=scale, t=scale)) for p in pictures]
        path = folder / f"episode_{i}.gif"
        images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
        paths.append(str(path))
    return paths


def task_episodes(model: WorldModel, dataset: EpisodeDataset) -> tuple[np.ndarray, str]:
    """The episodes tasks are drawn from: the held-out ones of the model's own dataset, or every
    episode of another dataset (which the model never trained on). -> (episodes, a description)."""
    if dataset.fingerprint() == model.data.fingerprint:
        return np.asarray(model.data.held_out), "held-out"
    return np.arange(dataset.num_episodes), "(another dataset than the model's: all)"


def plan(model: WorldModel, dataset: EpisodeDataset, planner_cfg: DictConfig, protocol: DictConfig, seed: int,
         device: torch.device, out_dir: Path, settings: dict) -> dict:
    """Plan under the protocol (and with random actions, the floor), print the summary and write
    eval.json and videos into out_dir, which must not exist yet: it is made first, so that an
    unwritable place fails before any planning (and is removed again if planning fails)."""
    if out_dir.exists():
        raise LeworldError(f"out_dir={out_dir} exists; results are never overwritten: pass another out_dir")
    try:
        out_dir.mkdir(parents=True)
    except OSError as err:
        raise LeworldError(f"cannot create out_dir={out_dir} ({err.strerror or err}); pass a writable out_dir") from None
    try:
        return plan_into(model, dataset, planner_cfg, protocol, seed, device, out_dir, settings)
    except BaseException:
        if not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def plan_into(model, dataset, planner_cfg, protocol, seed, device, out_dir: Path, settings: dict) -> dict:
    episodes, which = task_episodes(model, dataset)
    rows = sample_tasks(dataset, episodes, protocol.episodes, protocol.goal_offset, seed)
    receding = protocol.receding_horizon or protocol.horizon
    print(f"{model.env.name}: {protocol.episodes} episodes from {len(episodes)} {which} episodes of {dataset.path}; "
          f"goal {protocol.goal_offset} steps ahead, budget {protocol.budget} steps; planner {planner_cfg.name}, "
          f"horizon {protocol.horizon} chunks of {model.frameskip} steps, replanning every {receding}")
    results, solve_seconds, frames = evaluate(model, dataset, rows, planner_cfg, protocol, seed, device,
                                              record=protocol.videos)
    report = {"planner": summary(results, solve_seconds)}
    print(f"{planner_cfg.name}: success {100 * report['planner']['success_rate']:.1f}% ± "
          f"{100 * report['planner']['standard_error']:.1f}% over {len(results)} episodes, median final distance "
          f"{report['planner']['median_final_distance']:.3g}; median planning time "
          f"{report['planner']['median_solve_seconds']:.2f} s per solve of up to {protocol.batch} environments; "
          f"{100 * report['planner']['start_success_rate']:.0f}% of the starts already met their goal")
    rows_out = {"planner": results}
    if protocol.random_baseline:
        floor, _, _ = evaluate(model, dataset, rows, OmegaConf.create({"name": "random"}), protocol, seed, device)
        report["random"] = summary(floor, [])
        rows_out["random"] = floor
        print(f"random actions: success {100 * report['random']['success_rate']:.1f}% ± "
              f"{100 * report['random']['standard_error']:.1f}%, median final distance "
              f"{report['random']['median_final_distance']:.3g}")
    goal_frames = dataset.tensors["pixels"][torch.as_tensor(rows[:protocol.videos] + protocol.goal_offset)].numpy()
    videos = save_videos(frames, goal_frames, out_dir, protocol.videos)
    settings = settings | {"planner": OmegaConf.to_container(planner_cfg), "protocol": OmegaConf.to_container(protocol),
                           "seed": seed, "env": model.env.name, "dataset": str(dataset.path), "device": str(device),
                           "action_codec": model.codec.to_dict()}
    (out_dir / "eval.json").write_text(json.dumps({"settings": settings, "summary": report, "episodes": rows_out,
                                                   "videos": videos}, indent=1))
    print(f"saved {out_dir / 'eval.json'} and {len(videos)} videos")
    return report | {"out_dir": str(out_dir)}


def run_eval(cfg: DictConfig) -> dict:
    check_values(cfg, settings.evaluate(cfg))
    check_protocol(cfg)
    device = pick_device(cfg.device)
    kind = OmegaConf.select(cfg, "model.type")
    if kind == "oracle":
        model, dataset = Oracle.of(cfg)
        make_planner(cfg.planner, model.codec, cfg.seed, device)
        out_dir = Path(cfg.out_dir or f"runs/eval/oracle-{model.env.name}-{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}")
        return plan(model, dataset, cfg.planner, cfg.protocol, cfg.seed, device, out_dir, {"model": "oracle"})
    if kind is not None:
        raise LeworldError(f"eval takes model=oracle only (the simulator as the model); a trained model of type "
                           f"{kind} comes with ckpt=<its run folder>")
    if cfg.ckpt is None:
        raise LeworldError("ckpt is required: python -m leworld.eval ckpt=<run folder or checkpoint> (or model=oracle "
                           "env=<name> to plan with the simulator itself)")
    path = resolve_path(cfg.ckpt)
    model = load_world_model(path, device).requires_grad_(False)
    expected = OmegaConf.select(cfg, "env.name")
    if expected is not None and expected != model.env.name:
        raise LeworldError(f"{path} is a {model.env.name} world model, not {expected}; pass a {expected} checkpoint or drop env=")
    dataset = open_dataset(model, cfg.data_path)
    make_planner(cfg.planner, model.codec, cfg.seed, device)  # a bad planner setting fails before any folder is made
    out_dir = Path(cfg.out_dir or path.parent / "eval" / f"{cfg.planner.name}-{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}")
    return plan(model, dataset, cfg.planner, cfg.protocol, cfg.seed, device, out_dir, {"ckpt": str(path)})


def main() -> None:
    run_main("eval", run_eval)


if __name__ == "__main__":
    main()
