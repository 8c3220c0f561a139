"""python -m leworld.bench planning: world models side by side, timed on the path eval runs."""

import statistics
import time

import numpy as np
import torch
from einops import rearrange
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from leworld.bench.common import PeakMemory, machine_name, print_header, random_frames, synchronize
from leworld.codec import ActionCodec
from leworld.models import model_class
from leworld.planning import Goals, LatentObjective, make_planner
from leworld.runtime import autocast, load_config, pick_device


def bench_planning(cfg: DictConfig) -> dict:
    """World models side by side on the same inputs, timed on the path eval runs (leworld/planning):
    one solve = the objective's cost function for the observed frames (the context encoded once),
    then CEM over predictor rollouts; goals are encoded once per batch of tasks, outside the solve.
    Weights are random: time does not depend on them. Where a solve is too slow to run whole
    (DINO-WM on a CPU), `measure` runs fewer samples and iterations and scales the planning part by
    the ratio: every cost call does the same work per sample, so time and FLOPs grow linearly with
    samples x iterations. `compile` also times the cost under torch.compile (on CUDA with CUDA
    graphs: CEM's shapes do not change)."""
    spec = cfg.planning
    device = pick_device(cfg.device)
    print_header(f"CEM {spec.cem.samples} samples x {spec.cem.iterations} iterations, horizon {spec.horizon} chunks, "
                 f"{spec.context} context frames; random weights, median of {spec.repeats}", machine_name(device), "planning")
    print("| model | parameters | environments | compiled | timed as (samples x iterations) | ms per solve "
          "| environments per s | GFLOP per solve | peak MiB of one cost call (as timed) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    results = {}
    for name in spec.models:
        model_cfg = load_config("train", [f"model={name}", f"scale={spec.scale}"]).model  # gpu: 224-px frames
        codec = ActionCodec((0.0, 0.0), (1.0, 1.0), (-1.0, -1.0), (1.0, 1.0), model_cfg.frameskip)  # PushT's 2-d actions
        model = model_class(model_cfg.type)(model_cfg, codec).to(device).eval().requires_grad_(False)
        for b in spec.environments:
            solve = PlanningSolve(model, spec, (spec.measure.get(name) or {}), b, device)
            for compiled in spec.compile:
                results[name, b, compiled] = solve.time(compiled)
            mib = solve.peak_memory()  # after the timings: measuring slows the allocator
            for compiled in spec.compile:
                seconds, gflop, timed = results[name, b, compiled]
                print(f"| {name} | {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M | {b} | "
                      f"{'yes' if compiled else 'no'} | {timed} | {1000 * seconds:.0f} | {b / seconds:.2f} | "
                      f"{gflop:.0f} | {mib:.0f} |", flush=True)
    print()
    for b, compiled in ((b, c) for b in spec.environments for c in spec.compile):
        label = f"with {b} environment{'s' if b > 1 else ''}{', compiled' if compiled else ''}"
        if compiled and False in spec.compile:
            for name in spec.models:
                print(f"{name} {label}: {results[name, b, False][0] / results[name, b, True][0]:.2f}x faster than eager")
        if len(spec.models) == 2:
            (t0, f0, _), (t1, f1, _) = (results[name, b, compiled] for name in spec.models)
            print(f"{spec.models[1]} / {spec.models[0]} {label}: {t1 / t0:.0f}x the time per solve, {f1 / f0:.0f}x the FLOPs")
    return {f"{name} {b} env{' compiled' if compiled else ''}": {"ms_per_solve": 1000 * value[0], "gflop": value[1],
                                                                 "timed_as": value[2]}
            for (name, b, compiled), value in results.items()}


class PlanningSolve:
    """One model's CEM solve for b environments on random frames, as eval runs it."""

    def __init__(self, model, spec: DictConfig, measure: dict, b: int, device: torch.device):
        self.model, self.spec, self.b, self.device = model, spec, b, device
        self.samples = min(spec.cem.samples, measure.get("samples") or spec.cem.samples)
        self.iterations = min(spec.cem.iterations, measure.get("iterations") or spec.cem.iterations)
        self.scale = spec.cem.samples * spec.cem.iterations / (self.samples * self.iterations)
        generator = torch.Generator().manual_seed(0)
        hwc = rearrange(random_frames((b, spec.context + 1), model.image_size, generator), "b t c h w -> b t h w c")
        self.observed = {"pixels": hwc[:, :-1].numpy(), "state": np.zeros((b, spec.context, 1))}
        self.goals = Goals(hwc[:, -1].numpy(), np.zeros((b, 1)), None, None)
        self.taken = torch.randn(b, spec.context - 1, model.codec.block_dim, generator=generator)
        elites = max(2, round(spec.cem.elites * self.samples / spec.cem.samples))
        self.planner_cfg = OmegaConf.create({"name": "cem", "samples": self.samples, "elites": elites,
                                             "iterations": self.iterations})

    def time(self, compiled: bool) -> tuple[float, float, str]:
        """-> (seconds per solve, GFLOP per solve, how it was timed)."""
        if compiled:
            torch._dynamo.reset()  # each model and batch compiles afresh, within the recompile limit
        planner = make_planner(self.planner_cfg, self.model.codec, 0, self.device)
        index = np.arange(self.b)
        with torch.no_grad():
            objective = LatentObjective(self.model, self.goals, self.device, compile=compiled)
            cost = objective.cost_fn(self.observed, self.taken, index)  # warm-up; compiled: the compilation
            for _ in range(3 if compiled else 1):  # CUDA graphs are recorded on the third call
                cost(self.plans())
            times = []
            for _ in range(self.spec.repeats):
                synchronize(self.device)
                start = time.perf_counter()
                cost = objective.cost_fn(self.observed, self.taken, index)
                synchronize(self.device)
                encoded = time.perf_counter()
                planner.plan(cost, self.b, self.spec.horizon)
                synchronize(self.device)
                times.append(encoded - start + (time.perf_counter() - encoded) * self.scale)
        timed = "whole" if self.scale == 1 else f"{self.samples} x {self.iterations}, scaled"
        return statistics.median(times), self.gflop(objective), timed

    def plans(self) -> torch.Tensor:
        return torch.zeros(self.b, self.samples, self.spec.horizon, self.model.codec.block_dim, device=self.device)

    def gflop(self, objective: LatentObjective) -> float:
        """FLOPs of a whole solve: the context's encoding, and every cost call of every iteration."""
        with torch.no_grad(), autocast(self.device):
            with FlopCounterMode(display=False) as flops:
                context = objective.encode(self.observed["pixels"])
            encode_flops = flops.get_total_flops()
            with FlopCounterMode(display=False) as flops:
                self.model.plan_cost(context, objective.goals, self.plans(), self.taken.to(self.device))
        spec = self.spec
        return (encode_flops + flops.get_total_flops() * spec.cem.iterations * spec.cem.samples / self.samples) / 1e9

    def peak_memory(self) -> float:
        """Peak MiB of the context's encoding and one eager cost call (one iteration's worth: a solve's peak)."""
        objective = LatentObjective(self.model, self.goals, self.device)
        with torch.no_grad(), PeakMemory(self.device) as memory:
            objective.cost_fn(self.observed, self.taken, np.arange(self.b))(self.plans())
        return memory.mib
