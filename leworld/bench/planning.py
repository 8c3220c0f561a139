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
    then CEM over imagined rollouts; goals are encoded once per batch of tasks, outside the solve.
    Weights are random: time does not depend on them. A model is a preset, or a preset and
    overrides of its settings ("lewm_cpu model.predictor.positions=rotary"). `rollouts` times the
    straightforward rollout (reference) and the one that computes each thing once (fast) side by
    side, `compile` the cost under torch.compile (on CUDA with CUDA graphs: CEM's shapes do not
    change); their variants are timed in turn, repeat by repeat. Where a solve is too slow to run
    whole (DINO-WM on a CPU), `measure` runs fewer samples and iterations and scales the planning
    part by the ratio: every cost call does the same work per sample. With `swm` (a stable-worldmodel
    LeWM checkpoint folder): that model under leworld's CEM and under stable-worldmodel's (bench/swm.py)."""
    spec = cfg.planning
    if spec.swm is not None:
        from leworld.bench.swm import bench_swm  # here: only this comparison needs stable-worldmodel
        return bench_swm(cfg)
    device = pick_device(cfg.device)
    print_header(f"CEM {spec.cem.samples} samples x {spec.cem.iterations} iterations, horizon {spec.horizon} chunks, "
                 f"{spec.context} context frames; random weights, median of {spec.repeats}", machine_name(device), "planning")
    print("| model | parameters | environments | rollout | compiled | timed as (samples x iterations) | ms per solve "
          "| environments per s | GFLOP per solve | TFLOP/s | peak MiB of one cost call (as timed) |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    variants = [(rollout, compiled) for rollout in spec.rollouts for compiled in spec.compile]
    results, solves = {}, []
    for name in spec.models:
        preset, *overrides = name.split()
        model_cfg = load_config("train", [f"model={preset}", f"scale={spec.scale}", *overrides]).model  # gpu: 224 px
        codec = ActionCodec((0.0, 0.0), (1.0, 1.0), (-1.0, -1.0), (1.0, 1.0), model_cfg.frameskip)  # PushT's 2-d actions
        model = model_class(model_cfg.type)(model_cfg, codec).to(device).eval().requires_grad_(False)
        for b in spec.environments:
            solves.append((name, b, solve := PlanningSolve(model, spec, (spec.measure.get(preset) or {}), b, device)))
            for variant, (seconds, gflop) in solve.time(variants).items():
                results[name, b, *variant] = seconds, gflop, solve.timed_as
    for name, b, solve in solves:  # after all timings: measuring memory slows the allocator
        parameters = sum(p.numel() for p in solve.model.parameters()) / 1e6
        mib = {rollout: solve.peak_memory(rollout) for rollout in spec.rollouts}
        for rollout, compiled in variants:
            seconds, gflop, timed_as = results[name, b, rollout, compiled]
            print(f"| {name} | {parameters:.1f}M | {b} | {rollout} | {'yes' if compiled else 'no'} | {timed_as} | "
                  f"{1000 * seconds:.0f} | {b / seconds:.2f} | {gflop:.0f} | {gflop / seconds / 1000:.3f} | "
                  f"{mib[rollout]:.0f} |", flush=True)
    print()
    print_ratios(spec, variants, results)
    return {f"{name} {b} env{'' if rollout == 'fast' else ' ' + rollout}{' compiled' if compiled else ''}":
            {"ms_per_solve": 1000 * value[0], "gflop": value[1], "tflops": value[1] / value[0] / 1000, "timed_as": value[2]}
            for (name, b, rollout, compiled), value in results.items()}


def print_ratios(spec: DictConfig, variants: list[tuple], results: dict) -> None:
    """Each variant against the first (the straightforward, eager one when timed), and the second
    model against the first."""
    for name in spec.models:
        for b in spec.environments:
            base_seconds = results[name, b, *variants[0]][0]
            for rollout, compiled in variants[1:]:
                print(f"{name} with {b} environment{'s' if b > 1 else ''}: {rollout}{', compiled' if compiled else ''} "
                      f"{base_seconds / results[name, b, rollout, compiled][0]:.2f}x faster than "
                      f"{variants[0][0]}{', compiled' if variants[0][1] else ''}")
    if len(spec.models) == 2:
        for b in spec.environments:
            for variant in variants:
                (t0, f0, _), (t1, f1, _) = (results[name, b, *variant] for name in spec.models)
                print(f"{spec.models[1]} / {spec.models[0]} with {b} environments ({variant[0]}"
                      f"{', compiled' if variant[1] else ''}): {t1 / t0:.3g}x the time per solve, {f1 / f0:.3g}x the FLOPs")


class PlanningSolve:
    """One model's CEM solve for b environments on random frames, as eval runs it."""

    def __init__(self, model, spec: DictConfig, measure: dict, b: int, device: torch.device):
        self.model, self.spec, self.b, self.device = model, spec, b, device
        self.samples = min(spec.cem.samples, measure.get("samples") or spec.cem.samples)
        self.iterations = min(spec.cem.iterations, measure.get("iterations") or spec.cem.iterations)
        self.scale = spec.cem.samples * spec.cem.iterations / (self.samples * self.iterations)
        self.timed_as = "whole" if self.scale == 1 else f"{self.samples} x {self.iterations}, scaled"
        generator = torch.Generator().manual_seed(0)
        hwc = rearrange(random_frames((b, spec.context + 1), model.image_size, generator), "b t c h w -> b t h w c")
        self.observed = {"pixels": hwc[:, :-1].numpy(), "state": np.zeros((b, spec.context, 1))}
        self.goals = Goals(hwc[:, -1].numpy(), np.zeros((b, 1)), None, None)
        self.taken = torch.randn(b, spec.context - 1, model.codec.block_dim, generator=generator)
        elites = max(2, round(spec.cem.elites * self.samples / spec.cem.samples))
        self.planner_cfg = OmegaConf.create({"name": "cem", "samples": self.samples, "elites": elites,
                                             "iterations": self.iterations})

    def objective(self, rollout: str, compiled: bool) -> LatentObjective:
        """The reference: today's straightforward path, all rows at once; fast: as eval runs it."""
        reference = rollout == "reference"
        rows = None if reference or self.device.type != "cpu" else self.spec.cpu_rows_per_call
        return LatentObjective(self.model, self.goals, self.device, compile=compiled, reference=reference,
                               rows_per_call=rows)

    def time(self, variants: list[tuple[str, bool]]) -> dict[tuple[str, bool], tuple[float, float]]:
        """Each (rollout, compiled) variant's median seconds per solve and GFLOP per solve, the
        variants timed in turn within each repeat (these machines drift)."""
        index, objectives, planners, times = np.arange(self.b), {}, {}, {variant: [] for variant in variants}
        with torch.no_grad():
            for variant in variants:
                if variant[1]:
                    torch._dynamo.reset()  # each model and batch compiles afresh, within the recompile limit
                objectives[variant] = objective = self.objective(*variant)
                planners[variant] = make_planner(self.planner_cfg, self.model.codec, 0, self.device)
                cost = objective.cost_fn(self.observed, self.taken, index)  # warm-up; compiled: the compilation
                for _ in range(3 if variant[1] else 1):  # CUDA graphs are recorded on the third call
                    cost(self.plans())
            for _ in range(self.spec.repeats):
                for variant in variants:
                    synchronize(self.device)
                    start = time.perf_counter()
                    cost = objectives[variant].cost_fn(self.observed, self.taken, index)
                    synchronize(self.device)
                    encoded = time.perf_counter()
                    planners[variant].plan(cost, self.b, self.spec.horizon)
                    synchronize(self.device)
                    times[variant].append(encoded - start + (time.perf_counter() - encoded) * self.scale)
        return {variant: (statistics.median(times[variant]), self.gflop(objectives[variant])) for variant in variants}

    def plans(self) -> torch.Tensor:
        return torch.zeros(self.b, self.samples, self.spec.horizon, self.model.codec.block_dim, device=self.device)

    def gflop(self, objective: LatentObjective) -> float:
        """FLOPs of a whole solve: the context's encoding, and every cost call of every iteration."""
        with torch.no_grad(), autocast(self.device):
            with FlopCounterMode(display=False) as flops:
                context = objective.encode(self.observed["pixels"])
            encode_flops = flops.get_total_flops()
            with FlopCounterMode(display=False) as flops:
                objective.uncompiled_cost(context, objective.goals, self.plans(), self.taken.to(self.device))
        spec = self.spec
        return (encode_flops + flops.get_total_flops() * spec.cem.iterations * spec.cem.samples / self.samples) / 1e9

    def peak_memory(self, rollout: str) -> float:
        """Peak MiB of the context's encoding and one eager cost call (one iteration's worth: a solve's peak)."""
        objective = self.objective(rollout, compiled=False)
        with torch.no_grad(), PeakMemory(self.device) as memory:
            objective.cost_fn(self.observed, self.taken, np.arange(self.b))(self.plans())
        return memory.mib
