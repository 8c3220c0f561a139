"""python -m leworld.bench planning planning.swm=<a stable-worldmodel LeWM checkpoint folder>: the same
model planned by leworld's CEM and by stable-worldmodel's own CEMSolver, on the same machine, timed
in turn within each repeat (these machines drift).

- leworld: the folder read as model type lewm_swm (no unpickling, no instantiation), its context
  and goal encoded once per solve, CEM (planners/cem.py) over WorldModel.plan_cost;
- stable-worldmodel: their LeWM, built by their classes from the same folder (the config read as
  data by leworld/models/swm_format.py, the weights loaded weights-only), planned by their
  CEMSolver through their get_cost; their solver encodes the goal and the context in its first
  iteration and reuses them.
Both with the same samples, elites, iterations and horizon, on random frames at the model's size
and one context frame (their rollout takes a plan's first actions as the context frames' own).

Needs stable-worldmodel 0.1.1 and transformers (the test extra). stable-worldmodel's package
imports torchvision, whose PyPI wheel needs a CUDA torch, as does transformers when torchvision is
installed: where that import fails, their modules are loaded one by one without the packages'
__init__ files (`swm_module`), and transformers is kept from the broken torchvision.
"""

import contextlib
import importlib
import importlib.machinery
import importlib.util
import io
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from gymnasium.spaces import Box
from omegaconf import DictConfig

from leworld import LeworldError
from leworld.bench.common import machine_name, print_header, random_frames, synchronize
from leworld.checkpoint import load_weights, resolve_path
from leworld.codec import ActionCodec
from leworld.models import SwmLeWorldModel
from leworld.models.swm_format import VIT4, leworld_state, read_config, read_weights
from leworld.nn.preprocess import normalize, to_float
from leworld.runtime import pick_device
from planners.cem import CEM


def swm_module(name: str):
    """The module stable_worldmodel.<name>; its packages' __init__ files are skipped where the
    package cannot be imported (a CPU torch beside a CUDA torchvision wheel)."""
    full = f"stable_worldmodel.{name}"
    if getattr(sys.modules.get("stable_worldmodel"), "leworld_stub", False) is False:
        if importlib.util.find_spec("stable_worldmodel") is None:
            raise LeworldError("this needs stable-worldmodel 0.1.1: pip install 'leworld[test]'")
        try:
            return importlib.import_module(full)
        except (ImportError, RuntimeError):
            root = Path(importlib.util.find_spec("stable_worldmodel").origin).parent
            for loaded in [m for m in sys.modules if m.startswith("stable_worldmodel")]:
                del sys.modules[loaded]
            stub("stable_worldmodel", root)
    parts, root = full.split("."), Path(sys.modules["stable_worldmodel"].__path__[0])
    for i in range(2, len(parts)):
        if root.joinpath(*parts[1:i]).is_dir():
            stub(".".join(parts[:i]), root.joinpath(*parts[1:i]))
    if name == "wm.utils":  # it takes two helpers from the data package's __init__
        data = importlib.import_module("stable_worldmodel.data.utils")
        sys.modules["stable_worldmodel.data"].get_cache_dir = data.get_cache_dir
        sys.modules["stable_worldmodel.data"].ensure_dir_exists = data.ensure_dir_exists
    return importlib.import_module(full)


def stub(name: str, folder: Path) -> None:
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        package.__spec__.submodule_search_locations = package.__path__ = [str(folder)]
        package.leworld_stub = True
        sys.modules[name] = package


def transformers_vit():
    """transformers' ViTConfig and ViTModel, with a torchvision that cannot be imported taken for absent."""
    if importlib.util.find_spec("transformers") is None:
        raise LeworldError("this needs transformers (their LeWM's encoder): pip install 'leworld[test]'")
    if "torchvision" not in sys.modules:
        try:
            importlib.import_module("torchvision")
        except (ImportError, RuntimeError):
            for loaded in [m for m in sys.modules if m.startswith("torchvision")]:
                del sys.modules[loaded]
            sys.modules["torchvision"] = None  # transformers then runs without it, as where it is not installed
    from transformers import ViTConfig, ViTModel
    return ViTConfig, ViTModel


def their_lewm(folder: Path) -> torch.nn.Module:
    """stable-worldmodel's LeWM of a checkpoint folder, built by their classes (eval mode)."""
    cfg = read_config(folder)  # checks every _target_ and argument; nothing is instantiated from it
    lewm, module = swm_module("wm.lewm.lewm"), swm_module("wm.lewm.module")
    ViTConfig, ViTModel = transformers_vit()
    enc = cfg["encoder"]
    encoder = ViTModel(ViTConfig(hidden_size=enc["dim"], num_hidden_layers=enc["depth"], num_attention_heads=enc["heads"],
                                 intermediate_size=round(enc["mlp_ratio"] * enc["dim"]), image_size=enc["image_size"],
                                 patch_size=enc["patch_size"], layer_norm_eps=enc["eps"]), add_pooling_layer=False)
    norms = {"batch": torch.nn.BatchNorm1d, "layer": torch.nn.LayerNorm, None: None}

    def head(c: dict | None):
        return c and module.MLP(c["input_dim"], c["hidden_dim"], c["output_dim"], norm_fn=norms[c["norm"]])

    model = lewm.LeWM(encoder, module.Predictor(**cfg["predictor"]), module.Embedder(**cfg["action_encoder"]),
                      head(cfg["projector"]), head(cfg["pred_proj"]))
    state = read_weights(resolve_path(folder))
    def spelled_as_5(keys) -> bool:
        return any(k.startswith("encoder.layers.") for k in keys)

    if spelled_as_5(model.state_dict()) != spelled_as_5(state):
        state = respell(state)  # saved under the other transformers spelling than the installed one
    load_weights(model, {k: v for k, v in state.items() if "mask_token" not in k}, folder)
    return model.eval()


def respell(state: dict) -> dict:
    """A LeWM state dict with its ViT keys in the other transformers spelling (4.x <-> 5.x)."""
    four = any(k.startswith("encoder.encoder.layer.") for k in state)
    pairs = VIT4 if four else [(new, old) for old, new in reversed(VIT4)]
    out = {}
    for key, tensor in state.items():
        if key.startswith(("encoder.encoder.layer.", "encoder.layers.")):
            inner = key[len("encoder."):]
            for old, new in pairs:
                inner = inner.replace(old, new)
            key = "encoder." + inner
        out[key] = tensor
    return out


def bench_swm(cfg: DictConfig) -> dict:
    spec, folder = cfg.planning, Path(cfg.planning.swm)
    device = pick_device(cfg.device)
    ours = SwmLeWorldModel(read_config(folder), ActionCodec((0.0,), (1.0,), (-1.0,), (1.0,), 1))
    width = ours.cfg.action_encoder.input_dim  # plans' chunks are this wide whatever the env
    ours.load_their_weights(leworld_state(read_weights(resolve_path(folder))), folder)
    ours, theirs = ours.to(device).eval(), their_lewm(folder).to(device)
    cem = spec.cem
    print_header(f"one stable-worldmodel LeWM ({folder}), CEM {cem.samples} samples x {cem.iterations} iterations, "
                 f"{cem.elites} elites, horizon {spec.horizon} chunks; median of {spec.repeats}", machine_name(device),
                 "planning")
    print("| planner | environments | ms per solve | environments per s |")
    print("|---|---:|---:|---:|")
    results = {}
    for b in spec.environments:
        frames = random_frames((b, 2), ours.image_size, torch.Generator().manual_seed(0)).to(device)  # (B, 2, 3, H, W)
        times = {"leworld CEM": [], "stable-worldmodel CEMSolver": []}
        with torch.no_grad():
            for repeat in range(spec.repeats + 1):  # the first round warms up
                for name in times:
                    synchronize(device)
                    start = time.perf_counter()
                    solve(name, ours, theirs, frames, width, spec, device, seed=repeat)
                    synchronize(device)
                    if repeat:
                        times[name].append(time.perf_counter() - start)
        for name, seconds in times.items():
            results[f"{name} {b} env"] = {"ms_per_solve": 1000 * statistics.median(seconds)}
            print(f"| {name} | {b} | {1000 * statistics.median(seconds):.0f} | {b / statistics.median(seconds):.2f} |")
    print()
    for b in spec.environments:
        ratio = results[f"stable-worldmodel CEMSolver {b} env"]["ms_per_solve"] / results[f"leworld CEM {b} env"]["ms_per_solve"]
        print(f"with {b} environment{'s' if b > 1 else ''}: stable-worldmodel's CEMSolver takes {ratio:.2f}x leworld's time")
    return results


def solve(name: str, ours, theirs, frames: torch.Tensor, width: int, spec: DictConfig, device, seed: int) -> torch.Tensor:
    """One solve from frames[:, 0] to the goal frames[:, 1] -> the plan (B, H, width)."""
    b, cem = len(frames), spec.cem
    if name == "leworld CEM":
        context, goal = ours.encode(frames[:, :1]), ours.encode(frames[:, 1:])[:, 0]
        planner = CEM(width, cem.samples, cem.elites, cem.iterations, 1.0, seed=seed, device=device)
        return planner.plan(lambda plans: ours.plan_cost(context, goal, plans), b, spec.horizon)
    # batch_size 1, their default: their get_cost's goal latent (B, 1, D) broadcasts against (B, S, T, D) for B = 1 only
    solver = swm_module("solver.cem").CEMSolver(theirs, batch_size=1, num_samples=cem.samples, n_steps=cem.iterations,
                                                topk=cem.elites, device=device, seed=seed)
    solver.configure(action_space=Box(-np.inf, np.inf, (b, width)), n_envs=b,
                     config=types.SimpleNamespace(horizon=spec.horizon, action_block=1))
    pixels = normalize(to_float(frames))  # their evaluation's transform, done before the solver
    info = {"pixels": pixels[:, :1], "goal": pixels[:, 1:], "action": torch.zeros(b, 1, width, device=device)}
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its time at every solve
        return solver.solve(info)["actions"]
