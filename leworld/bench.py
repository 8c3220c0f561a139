"""Benchmarks: python -m leworld.bench <name> [key=value ...]

    sigreg   time and peak memory of SIGReg (forward + backward) over a grid of batch sizes N and
             slice counts M, for leworld's implementation and the naive one, side by side
    collect  environment steps per second (expert policy, rendering included) per worker, at
             several image sizes, with 1 and more worker processes
    sampler  training clips per second from the clip sampler, from memory and from the memory map
    planning world models side by side (LeWM, DINO-WM): time per CEM solve with one environment
             and with many planned in one batch, FLOPs per solve, peak memory, and the ratios
    train    the training step of model presets (forward, backward, AdamW): clips per second,
             FLOPs per step and model FLOP utilisation against the device's peak, eager and compiled

Each prints a markdown table with the machine and the command; docs/benchmarks.md keeps the results.
"""

import ctypes
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

import envs
from leworld.collect import collect
from leworld.data import ActionCodec, ClipSampler, EpisodeDataset
from leworld.models import WORLD_MODELS
from leworld.optim import Optimisation
from leworld import settings
from leworld.runtime import Processes, autocast, check_values, load_config, pick_device, run_main
from leworld.sigreg import SIGReg, quadrature
from planners import CEM


def naive_epps_pulley(x: torch.Tensor, knots: int, t_max: float) -> torch.Tensor:
    """The textbook expression, x (N, M) -> (M,): autograd keeps (N, M, T) cos and sin tensors."""
    t, weights, phi = quadrature(knots, t_max, x.device)
    tx = x[..., None] * t  # (N, M, T)
    return x.shape[0] * ((tx.cos().mean(0) - phi) ** 2 + tx.sin().mean(0) ** 2) @ weights


class PeakMemory:
    """Peak memory (MiB) allocated inside the block, above what was in use when it started.

    CUDA: the caching allocator's peak. CPU (Linux, glibc): the process's peak resident set
    (VmHWM), reset on entry through /proc/self/clear_refs. glibc keeps freed blocks in its heap and
    hands them out again without the resident set growing, so on entry its free pages are given
    back to the system (malloc_trim) and every new block of 64 KiB or more is made its own
    mapping. That slows allocation for the rest of the process: time things before measuring memory.
    """

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            libc, M_MMAP_THRESHOLD = ctypes.CDLL("libc.so.6"), -3
            libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
            libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = self._status("VmHWM")
        self.mib = (peak - self.start) / 2**20


def _sigreg_step(impl: str, z: torch.Tensor, sigreg: SIGReg) -> None:
    if impl == "leworld":
        loss = sigreg(z)
    else:
        loss = naive_epps_pulley(z @ sigreg.directions(z.shape[-1], z.device), sigreg.knots, sigreg.t_max).mean()
    loss.backward()


def bench_sigreg(cfg: DictConfig) -> None:
    device = pick_device(cfg.device)
    spec = cfg.sigreg
    print(f"SIGReg forward + backward, D={spec.dim}, {spec.knots} knots, median of {spec.repeats} after a warm-up")
    print(f"machine: {machine_name(device)}")
    print(f"command: python -m leworld.bench sigreg {' '.join(sys.argv[2:])}".rstrip() + "\n")
    print("| N | M | leworld ms | naive ms | leworld peak MiB | naive peak MiB | memory ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    grid = [(n, m, impl) for n in spec.n for m in spec.m for impl in ("leworld", "naive")]
    milliseconds, mebibytes = {}, {}
    for n, m, impl in grid:  # all timings first: measuring memory slows the allocator (see PeakMemory)
        sigreg = SIGReg(num_slices=m, knots=spec.knots).to(device)
        z = torch.randn(n, spec.dim, device=device, requires_grad=True)
        _sigreg_step(impl, z, sigreg)  # warm-up
        times = []
        for _ in range(spec.repeats):
            z.grad = None
            _sync(device)
            start = time.perf_counter()
            _sigreg_step(impl, z, sigreg)
            _sync(device)
            times.append(time.perf_counter() - start)
        milliseconds[n, m, impl] = 1000 * statistics.median(times)
    for n, m, impl in grid:
        sigreg = SIGReg(num_slices=m, knots=spec.knots).to(device)
        z = torch.randn(n, spec.dim, device=device, requires_grad=True)
        with PeakMemory(device) as memory:
            _sigreg_step(impl, z, sigreg)
        mebibytes[n, m, impl] = memory.mib
    for n in spec.n:
        for m in spec.m:
            ours, naive = mebibytes[n, m, "leworld"], mebibytes[n, m, "naive"]
            print(f"| {n} | {m} | {milliseconds[n, m, 'leworld']:.1f} | {milliseconds[n, m, 'naive']:.1f} | "
                  f"{ours:.1f} | {naive:.1f} | {naive / max(ours, 1e-3):.1f}x |", flush=True)


def random_frames(shape: tuple[int, int], size: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 frames (B, T, 3, H, W) laid out as leworld's datasets and envs hand them over: a view
    of (B, T, H, W, 3) memory, channels-last. Contiguous (B, T, 3, H, W) frames would time slower
    convolutions than training and planning ever run (1.3x at the CPU preset)."""
    hwc = torch.randint(0, 256, (*shape, size, size, 3), dtype=torch.uint8, generator=generator)
    return rearrange(hwc, "b t h w c -> b t c h w")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else None
    cpu = found.group(1) if found else platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


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
    print(f"environment steps per second, expert policy, rendering included ({spec.steps} steps per worker)")
    print(f"machine: {machine_name(torch.device('cpu'))}, MUJOCO_GL={os.environ.get('MUJOCO_GL')}")
    print(f"command: python -m leworld.bench collect {' '.join(sys.argv[2:])}".rstrip() + "\n")
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
        print(f"clips of {spec.frames} frames, frameskip {spec.frameskip}, from {path} "
              f"({dataset.meta['num_frames']} frames of {'x'.join(map(str, dataset.meta['image_shape']))})")
        print(f"machine: {machine_name(device)}")
        print(f"command: python -m leworld.bench sampler {' '.join(sys.argv[2:])}".rstrip() + "\n")
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
                _sync(device)
                start, clips = time.perf_counter(), 0
                while time.perf_counter() - start < spec.seconds:
                    batch = sampler.sample(batch_size, generator)
                    clips += batch_size
                _sync(device)
                print(f"| {source} | {batch_size} | {clips / (time.perf_counter() - start):.0f} |", flush=True)


def bench_planning(cfg: DictConfig) -> dict:
    """World models side by side on the same inputs. One solve = encode the context frames and the
    goal once, then CEM over predictor rollouts. Weights are random: time does not depend on them.
    Where a solve is too slow to run whole (DINO-WM on a CPU), `measure` runs fewer samples and
    iterations and scales the planning part by the ratio: every cost call does the same work per
    sample, so time and FLOPs grow linearly with samples x iterations. `compile` also times the
    cost under torch.compile (on CUDA with CUDA graphs: CEM's shapes do not change)."""
    spec = cfg.planning
    device = pick_device(cfg.device)
    total = spec.cem.samples * spec.cem.iterations
    print(f"CEM {spec.cem.samples} samples x {spec.cem.iterations} iterations, horizon {spec.horizon} chunks, "
          f"{spec.context} context frames; random weights, median of {spec.repeats}")
    print(f"machine: {machine_name(device)}")
    print(f"command: python -m leworld.bench planning {' '.join(sys.argv[2:])}".rstrip() + "\n")
    print("| model | parameters | environments | compiled | timed as (samples x iterations) | ms per solve "
          "| environments per s | GFLOP per solve | peak MiB of one cost call (as timed) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    results, memory_runs = {}, []
    for name in spec.models:
        model_cfg = load_config("train", [f"model={name}", f"scale={spec.scale}"]).model  # gpu: 224-px frames
        codec = ActionCodec((0.0, 0.0), (1.0, 1.0), (-1.0, -1.0), (1.0, 1.0), model_cfg.frameskip)  # PushT's 2-d actions
        model = WORLD_MODELS[model_cfg.type](model_cfg, codec).to(device).eval().requires_grad_(False)
        parameters = sum(p.numel() for p in model.parameters())
        measure = spec.measure.get(name) or {}
        samples = min(spec.cem.samples, measure.get("samples") or spec.cem.samples)
        iterations = min(spec.cem.iterations, measure.get("iterations") or spec.cem.iterations)
        scale = total / (samples * iterations)
        for b, compiled in ((b, c) for b in spec.environments for c in spec.compile):
            generator = torch.Generator().manual_seed(0)
            frames = random_frames((b, spec.context + 1), model.image_size, generator).to(device)
            taken = torch.randn(b, spec.context - 1, model.codec.block_dim, generator=generator).to(device)
            planner = CEM(model.codec.block_dim, samples=samples, iterations=iterations, device=device,
                          elites=max(2, round(spec.cem.elites * samples / spec.cem.samples)))
            plan_cost = model.plan_cost
            if compiled:
                torch._dynamo.reset()  # each model and batch compiles afresh, within the recompile limit
                plan_cost = torch.compile(plan_cost, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)

            def encode():
                latents = model.encode(frames)  # context and goal, once per solve
                return latents[:, :-1], latents[:, -1]

            def plan(context, goal):
                return planner.plan(lambda plans: plan_cost(context, goal, plans, taken), b, spec.horizon)

            with torch.no_grad(), autocast(device):
                context, goal = encode()  # warm-up; compiled: the compilation, at the shapes CEM uses
                for _ in range(3 if compiled else 1):  # CUDA graphs are recorded on the third call
                    plan_cost(context, goal, torch.zeros(b, samples, spec.horizon, model.codec.block_dim, device=device),
                              taken)
                times = []
                for _ in range(spec.repeats):
                    _sync(device)
                    start = time.perf_counter()
                    context, goal = encode()
                    _sync(device)
                    encoded = time.perf_counter()
                    plan(context, goal)
                    _sync(device)
                    times.append(encoded - start + (time.perf_counter() - encoded) * scale)
                seconds = statistics.median(times)
                with FlopCounterMode(display=False) as flops:
                    context, goal = encode()
                encode_flops = flops.get_total_flops()
                plans = torch.zeros(b, samples, spec.horizon, model.codec.block_dim, device=device)
                with FlopCounterMode(display=False) as flops:
                    model.plan_cost(context, goal, plans, taken)
                gflop = (encode_flops + flops.get_total_flops() * spec.cem.iterations * spec.cem.samples / samples) / 1e9
            timed = "whole" if scale == 1 else f"{samples} x {iterations}, scaled"
            results[name, b, compiled] = seconds, gflop, timed, parameters
            if compiled == spec.compile[0]:
                memory_runs.append((name, b, model, frames, plans, taken))
    for name, b, model, frames, plans, taken in memory_runs:  # after all timings: measuring slows the allocator
        with torch.no_grad(), autocast(device), PeakMemory(device) as memory:
            latents = model.encode(frames)
            model.plan_cost(latents[:, :-1], latents[:, -1], plans, taken)  # one iteration's worth (eager): a solve's peak
        for compiled in spec.compile:
            seconds, gflop, timed, parameters = results[name, b, compiled]
            print(f"| {name} | {parameters / 1e6:.1f}M | {b} | {'yes' if compiled else 'no'} | {timed} | "
                  f"{1000 * seconds:.0f} | {b / seconds:.2f} | {gflop:.0f} | {memory.mib:.0f} |", flush=True)
    print()
    for b, compiled in ((b, c) for b in spec.environments for c in spec.compile):
        label = f"with {b} environment{'s' if b > 1 else ''}{', compiled' if compiled else ''}"
        if compiled and False in spec.compile:
            for name in spec.models:
                print(f"{name} {label}: {results[name, b, False][0] / results[name, b, True][0]:.2f}x faster than eager")
        if len(spec.models) == 2:
            (t0, f0, *_), (t1, f1, *_) = (results[name, b, compiled] for name in spec.models)
            print(f"{spec.models[1]} / {spec.models[0]} {label}: {t1 / t0:.0f}x the time per solve, {f1 / f0:.0f}x the FLOPs")
    return {f"{name} {b} env{' compiled' if compiled else ''}": {"ms_per_solve": 1000 * value[0], "gflop": value[1],
                                                                 "timed_as": value[2]}
            for (name, b, compiled), value in results.items()}


# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s, by a name torch reports.
PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4,
               "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.2}


def device_peak_tflops(device: torch.device, stated: float | None) -> tuple[float | None, str]:
    """The peak that MFU divides by, and where it comes from (a value given in the config wins)."""
    if stated is not None:
        return stated, "train.peak_tflops"
    if device.type != "cuda":
        return None, "no stated peak for a CPU (pass train.peak_tflops=)"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():  # the most specific names come first
        if key in name:
            return peak, f"{name}: dense bf16 data-sheet peak"
    return None, f"{name} is not in leworld.bench.PEAK_TFLOPS (pass train.peak_tflops=)"


def bench_train(cfg: DictConfig) -> dict:
    """One training step as `python -m leworld.train` takes it (bf16 autocast and fused AdamW on
    CUDA, the uint8 clips already on the device), on random frames: time does not depend on them.
    FLOPs are counted by torch.utils.flop_counter over forward and backward (matrix products and
    convolutions, as MFU counts them)."""
    spec = cfg.train
    device = pick_device(cfg.device)
    peak, peak_source = device_peak_tflops(device, spec.peak_tflops)
    print(f"training step: {spec.steps} timed steps after {spec.warmup} (median of {spec.repeats} rounds), "
          f"frames at scale={spec.scale}")
    print(f"machine: {machine_name(device)}; peak: {f'{peak:g} TFLOP/s' if peak else 'none'} ({peak_source})")
    print(f"command: python -m leworld.bench train {' '.join(sys.argv[2:])}".rstrip() + "\n")
    print("| model | parameters | image | batch | compiled | ms per step | clips per s | GFLOP per step | TFLOP/s | MFU |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    results = {}
    for name in spec.models:  # a preset, or preset:encoder to swap its backbone (lewm_cpu:vit_cpu)
        preset, _, encoder = name.partition(":")
        overrides = [f"model={preset}", f"scale={spec.scale}"] + ([f"encoder={encoder}"] if encoder else [])
        run_cfg = load_config("train", overrides)
        model_cfg, batch_size = run_cfg.model, spec.batch_size or run_cfg.train.batch_size
        codec = ActionCodec((0.0, 0.0), (1.0, 1.0), (-1.0, -1.0), (1.0, 1.0), model_cfg.frameskip)  # PushT's 2-d actions
        generator = torch.Generator().manual_seed(0)
        frames = model_cfg.history + 1
        image = run_cfg.env.kwargs.image_size
        batch = {"pixels": random_frames((batch_size, frames), image, generator).to(device),
                 "actions": torch.randn(batch_size, frames, codec.block_dim, generator=generator).to(device)}
        for compiled in spec.compile:
            torch.manual_seed(0)
            model = WORLD_MODELS[model_cfg.type](model_cfg, codec)
            opt = Optimisation.start(model, Processes(0, 1, device), run_cfg.train, total_steps=10**6)
            net = torch.compile(opt.net) if compiled else opt.net

            def step():
                with autocast(device):
                    loss = net(batch)["loss"]
                opt.step(loss)

            for _ in range(spec.warmup):  # compilation, autotuning, the allocator's first blocks
                step()
            rounds = []
            for _ in range(spec.repeats):
                _sync(device)
                start = time.perf_counter()
                for _ in range(spec.steps):
                    step()
                _sync(device)
                rounds.append((time.perf_counter() - start) / spec.steps)
            seconds = statistics.median(rounds)
            with FlopCounterMode(display=False) as counter:
                with autocast(device):
                    loss = opt.model(batch)["loss"]
                loss.backward()
            flops = counter.get_total_flops()
            achieved = flops / seconds / 1e12
            mfu = f"{100 * achieved / peak:.1f}%" if peak else "-"
            parameters = sum(p.numel() for p in model.parameters())
            print(f"| {name} | {parameters / 1e6:.1f}M | {image} | {batch_size} | {'yes' if compiled else 'no'} | "
                  f"{1000 * seconds:.1f} | {batch_size / seconds:.0f} | {flops / 1e9:.0f} | {achieved:.2f} | {mfu} |",
                  flush=True)
            results[name, compiled] = {"ms_per_step": 1000 * seconds, "clips_per_s": batch_size / seconds,
                                       "gflop_per_step": flops / 1e9, "tflops": achieved,
                                       "mfu": achieved / peak if peak else None}
    return {f"{name}{' compiled' if compiled else ''}": value for (name, compiled), value in results.items()}


BENCHMARKS = {"sigreg": bench_sigreg, "collect": bench_collect, "sampler": bench_sampler, "planning": bench_planning,
              "train": bench_train}


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else None
    if name not in BENCHMARKS:
        print(f"usage: python -m leworld.bench {{{','.join(BENCHMARKS)}}} [key=value ...]", file=sys.stderr)
        sys.exit(2)

    def checked_run(cfg: DictConfig):
        check_values(cfg, settings.bench(cfg))
        return BENCHMARKS[name](cfg)

    run_main("bench", checked_run, sys.argv[2:])


if __name__ == "__main__":
    main()
