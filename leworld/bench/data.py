"""python -m leworld.bench collect | sampler: environment steps per second while collecting, and
training clips per second from the clip sampler."""

import multiprocessing as mp
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from omegaconf import DictConfig

import envs
from leworld.bench.common import machine_name, print_header, synchronize
from leworld.codec import ActionCodec
from leworld.collect import collect
from leworld.dataset import ClipSampler, EpisodeDataset
from leworld.runtime import load_config, pick_device


def _env_steps(name: str, image_size: int, steps: int) -> tuple[int, float, float]:
    """Run `steps` steps of an environment under its expert (episodes of 100): (steps, start, end)
    in wall-clock seconds, comparable across processes."""
    torch.set_num_threads(1)
    env = envs.make(name, image_size=image_size)
    env.reset(seed=0)  # the renderer starts here, outside the timing
    rng = np.random.default_rng(0)
    start = time.time()
    for done in range(steps):
        if done % 100 == 0:
            _, info = env.reset(seed=done)
            policy = envs.make_policy(name, env, rng, expert=True)
            policy.reset(info["state"])
        _, _, _, _, info = env.step(policy(info["state"]))
    return steps, start, time.time()


def bench_collect(cfg: DictConfig) -> None:
    spec = cfg.collect
    print_header(f"environment steps per second, expert policy, rendering included ({spec.steps} steps per worker)",
                 f"{machine_name(torch.device('cpu'))}, MUJOCO_GL={os.environ.get('MUJOCO_GL')}", "collect")
    print("| env | image | workers | steps/s per worker | steps/s in all |")
    print("|---|---:|---:|---:|---:|")
    for name in spec.envs:
        for size in spec.image_sizes:
            for workers in spec.workers:
                with mp.get_context("spawn").Pool(workers) as pool:
                    results = pool.starmap(_env_steps, [(name, size, spec.steps)] * workers)
                per_worker = statistics.mean(steps / (end - start) for steps, start, end in results)
                span = max(end for _, _, end in results) - min(start for _, start, _ in results)
                total = sum(steps for steps, _, _ in results) / span
                print(f"| {name} | {size} | {workers} | {per_worker:.0f} | {total:.0f} |", flush=True)


def bench_sampler(cfg: DictConfig) -> None:
    spec = cfg.sampler
    with tempfile.TemporaryDirectory() as scratch:
        path = spec.path
        if path is None:  # a dataset of the CPU default's kind, made for the occasion
            path = f"{scratch}/pusht"
            collect(load_config("collect", [f"path={path}", f"episodes={spec.episodes}", "env=pusht"]))
        dataset = EpisodeDataset.open(path)
        device = pick_device(cfg.device)
        print_header(f"clips of {spec.frames} frames, frameskip {spec.frameskip}, from {path} ({dataset.meta['num_frames']} "
                     f"frames of {'x'.join(map(str, dataset.meta['image_shape']))})", machine_name(device), "sampler")
        print("| source | batch | clips/s |")
        print("|---|---:|---:|")
        episodes = np.arange(dataset.num_episodes)
        for source, data in [("memory map", dataset), (f"in memory ({device.type})", dataset.to(device))]:
            stats = dataset.meta["stats"]["action"]
            codec = ActionCodec.from_stats(stats, stats["min"], stats["max"], spec.frameskip)
            sampler = ClipSampler(data, episodes, spec.frames, codec)
            generator = sampler.generator(0)
            for batch_size in spec.batch_sizes:
                sampler.sample(batch_size, generator)  # warm-up
                synchronize(device)
                start, clips = time.perf_counter(), 0
                while time.perf_counter() - start < spec.seconds:
                    sampler.sample(batch_size, generator)
                    clips += batch_size
                synchronize(device)
                print(f"| {source} | {batch_size} | {clips / (time.perf_counter() - start):.0f} |", flush=True)
