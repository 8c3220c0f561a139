"""python -m leworld.bench train: the training step of model presets, eager and compiled: clips per
second, FLOPs per step and model FLOP utilisation against the device's peak."""

import statistics
import time

import torch
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from leworld.bench.common import machine_name, print_header, random_frames, synchronize
from leworld.codec import ActionCodec
from leworld.models import model_class
from leworld.optim import Optimisation
from leworld.runtime import Processes, autocast, load_config, pick_device


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
    print_header(f"training step: {spec.steps} timed steps after {spec.warmup} (median of {spec.repeats} rounds), frames at "
                 f"scale={spec.scale}", f"{machine_name(device)}; peak: {f'{peak:g} TFLOP/s' if peak else 'none'} ({peak_source})",
                 "train")
    print("| model | parameters | image | batch | compiled | ms per step | clips per s | GFLOP per step | TFLOP/s | MFU |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    results = {}
    for name in spec.models:  # a preset, or preset:backbone to swap its backbone (lewm_cpu:vit_cpu)
        preset, _, backbone = name.partition(":")
        overrides = [f"model={preset}", f"scale={spec.scale}"] + ([f"backbone={backbone}"] if backbone else [])
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
            model = model_class(model_cfg.type)(model_cfg, codec)
            opt = Optimisation.start(model, Processes(0, 1, device), run_cfg.train, total_steps=10**6)
            seconds, flops = time_steps(opt, batch, compiled, spec, device)
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


def time_steps(opt: Optimisation, batch: dict, compiled: bool, spec: DictConfig, device: torch.device) -> tuple[float, int]:
    """-> (median seconds per step, FLOPs of one forward and backward)."""
    net = torch.compile(opt.net) if compiled else opt.net

    def step():
        with autocast(device):
            loss = net(batch)["loss"]
        opt.step(loss)

    for _ in range(spec.warmup):  # compilation, autotuning, the allocator's first blocks
        step()
    rounds = []
    for _ in range(spec.repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(spec.steps):
            step()
        synchronize(device)
        rounds.append((time.perf_counter() - start) / spec.steps)
    with FlopCounterMode(display=False) as counter:
        with autocast(device):
            loss = opt.model(batch)["loss"]
        loss.backward()
    return statistics.median(rounds), counter.get_total_flops()
