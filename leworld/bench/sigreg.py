"""python -m leworld.bench sigreg: SIGReg's time and peak memory against the naive implementation."""

import statistics
import time

import torch
from omegaconf import DictConfig

from leworld.bench.common import PeakMemory, machine_name, print_header, synchronize
from leworld.runtime import pick_device
from leworld.sigreg import SIGReg, quadrature


def naive_epps_pulley(x: torch.Tensor, knots: int, t_max: float) -> torch.Tensor:
    """The textbook expression, x (N, M) -> (M,): autograd keeps (N, M, T) cos and sin tensors."""
    t, weights, phi = quadrature(knots, t_max, x.device)
    tx = x[..., None] * t  # (N, M, T)
    return x.shape[0] * ((tx.cos().mean(0) - phi) ** 2 + tx.sin().mean(0) ** 2) @ weights


def _sigreg_step(impl: str, z: torch.Tensor, sigreg: SIGReg) -> None:
    if impl == "leworld":
        loss = sigreg(z)
    else:
        loss = naive_epps_pulley(z @ sigreg.directions(z.shape[-1], z.device), sigreg.knots, sigreg.t_max).mean()
    loss.backward()


def bench_sigreg(cfg: DictConfig) -> None:
    device = pick_device(cfg.device)
    spec = cfg.sigreg
    print_header(f"SIGReg forward + backward, D={spec.dim}, {spec.knots} knots, median of {spec.repeats} after a warm-up",
                 machine_name(device), "sigreg")
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
            synchronize(device)
            start = time.perf_counter()
            _sigreg_step(impl, z, sigreg)
            synchronize(device)
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
