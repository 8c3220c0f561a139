"""Plan with a trained world model:  python -m leworld.eval ckpt=<run folder> [planner=cem] [key=value ...]
Plan with the simulator itself:     python -m leworld.eval model=oracle env=pusht
Plan with a stable-worldmodel LeWM:  python -m leworld.eval ckpt=<its checkpoint folder> env=pusht
Plan with a perfect predictor:      python -m leworld.eval ckpt=<run folder> imagine=simulator
                                    (each plan simulated, its last frame scored by the model's encoder
                                    and distance: what the encoder's latents allow at best)
Measure latents in chunks:          python -m leworld.eval ckpt=<run folder> metric=change
                                    (the planning cost's distance whitened by how the training episodes'
                                    latents change in one chunk: leworld/planning/metric.py)

Runs the planning protocol of LeWM and DINO-WM (leworld/planning/, configs/protocol/default.yaml)
on held-out episodes of the model's dataset, against random actions, and writes eval.json and GIFs
into out_dir. The oracle plans on the tasks a default training run of that env is evaluated on.
"""

import datetime
import functools
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import envs
from leworld import LeworldError, settings
from leworld.checkpoint import FILENAME
from leworld.dataset import EpisodeDataset
from leworld.decode import FOLDER as DECODER
from leworld.decode import load_decoder
from leworld.models import EnvSpec, open_world_model
from leworld.planning import (EncodedSimulatorObjective, LatentObjective, Oracle, SimulatorObjective, check_protocol,
                              evaluate, make_planner)
from leworld.planning.metric import measure_in_chunks
from leworld.prior import load_prior
from leworld.runtime import check_values, load_config, pick_device, run_main


def run_eval(cfg: DictConfig) -> dict:
    check_values(cfg, settings.evaluate(cfg))
    check_protocol(cfg)
    device = pick_device(cfg.device)
    kind = OmegaConf.select(cfg, "model.type")
    if kind == "oracle":
        if cfg.metric != "latent":
            raise LeworldError(f"metric={cfg.metric} measures a world model's latents; the oracle scores states: drop metric=")
        model, dataset = oracle(cfg)
        make_planner(cfg.planner, model.codec, cfg.seed, device)  # a bad planner setting fails before any folder is made
        out_dir = Path(cfg.out_dir or f"runs/eval/oracle-{model.env.name}-{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}")
        return evaluate(model, dataset, cfg.planner, cfg.protocol, cfg.seed, device, out_dir, {"model": "oracle"},
                        objective=SimulatorObjective)
    if kind is not None:
        raise LeworldError(f"eval takes model=oracle only (the simulator as the model); a trained model of type "
                           f"{kind} comes with ckpt=<its run folder>")
    if cfg.ckpt is None:
        raise LeworldError("ckpt is required: python -m leworld.eval ckpt=<run folder or checkpoint> (or model=oracle "
                           "env=<name> to plan with the simulator itself)")
    model, path, dataset = open_world_model(cfg, device, "eval")
    model.requires_grad_(False)
    expected = OmegaConf.select(cfg, "env.name")
    if expected is not None and expected != model.env.name:
        raise LeworldError(f"{path} is a {model.env.name} world model, not {expected}; pass a {expected} checkpoint or drop env=")
    make_planner(cfg.planner, model.codec, cfg.seed, device)  # a bad planner setting fails before any folder is made
    objective, scorer = imagination(cfg, model, dataset, device)
    with_prior = cfg.prior or cfg.planner.name == "prior"
    prior = load_prior(path, model, device) if with_prior else None
    name = f"{cfg.planner.name}{'-prior' if with_prior and cfg.planner.name != 'prior' else ''}"
    name += ("-simulator" if cfg.imagine == "simulator" else "") + ("-untrained" if cfg.untrained else "")
    name += "-change" if cfg.metric == "change" else ""
    out_dir = Path(cfg.out_dir or path.parent / "eval" / f"{name}-{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}")
    return evaluate(scorer, dataset, cfg.planner, cfg.protocol, cfg.seed, device, out_dir,
                    {"ckpt": str(path), "prior": with_prior, "imagine": cfg.imagine, "untrained": cfg.untrained,
                     "metric": cfg.metric, **({"metric_shrink": cfg.metric_shrink} if cfg.metric == "change" else {})},
                    objective=functools.partial(objective, prior=prior), oracle=oracle_summary(cfg, model, dataset),
                    decoder=decoder_of(path, device) if scorer is model else None)  # the decoder reads trained latents


def imagination(cfg: DictConfig, model, dataset: EpisodeDataset, device):
    """What imagines where a plan ends (`imagine`: the model, or the simulator with the last frame
    encoded), which model scores it (the trained one, or with `untrained` the same untrained, for what
    training the encoder did to its latent distance) and how it measures latents (`metric`).
    -> (objective, model)"""
    if cfg.untrained:
        if cfg.imagine != "simulator":
            raise LeworldError("untrained=true plans with an untrained model, whose predictor imagines nothing; "
                               "add imagine=simulator (plans simulated, their ends scored by the untrained encoder)")
        if cfg.prior or cfg.planner.name == "prior":
            raise LeworldError("the policy prior reads the trained encoder's latents, not an untrained one's: drop "
                               "prior=true / planner=prior, or untrained=true")
        model = model.untrained(cfg.seed).to(device).eval().requires_grad_(False)
    if cfg.metric == "change":
        model.metric = measure_in_chunks(model, dataset, cfg.metric_shrink, device)
        print(f"metric=change: latent differences measured in units of one chunk's latent change over the training "
              f"episodes (its covariance shrunk by {cfg.metric_shrink:g}); every cost below is in that measure")
    if cfg.imagine != "simulator":
        return LatentObjective, model
    print("imagine=simulator: every plan is simulated and its last frame encoded by the model, which scores it with "
          f"its own distance{' (the encoder untrained)' if cfg.untrained else ''}; its predictor is not used, so a "
          "'model' failure below is its encoder's distance, and 'open-loop error' still the predictor's")
    return EncodedSimulatorObjective, model


def decoder_of(path: Path, device):
    """The run's pixel decoder (python -m leworld.decode train), for videos of what the model imagined;
    None where it has none, or one made from an earlier step of the model (said, not fatal)."""
    if not (path.parent / DECODER / FILENAME).is_file():
        return None
    try:
        return load_decoder(path, device)
    except LeworldError as err:
        print(f"note: {err}; the videos show no imagined frames")
        return None


def oracle_summary(cfg: DictConfig, model, dataset: EpisodeDataset) -> dict | None:
    """The oracle's summary from the eval folder `oracle` names, refused unless it planned the same
    tasks: the env, the dataset and the protocol's tasks (episodes, seed, goal offset, budget)."""
    if cfg.oracle is None:
        return None
    found = Path(cfg.oracle) / "eval.json"
    if not found.is_file():
        raise LeworldError(f"oracle={cfg.oracle} holds no eval.json; make one with python -m leworld.eval model=oracle "
                           f"env={model.env.name}")
    saved = json.loads(found.read_text())
    recorded, tasks = saved["settings"], ("episodes", "goal_offset", "budget")
    same = (recorded.get("model") == "oracle" and recorded["env"] == model.env.name
            and Path(recorded["dataset"]).resolve() == Path(dataset.path).resolve() and recorded["seed"] == cfg.seed
            and all(recorded["protocol"][k] == cfg.protocol[k] for k in tasks))
    if not same:
        raise LeworldError(f"{found} is not an oracle's eval on these tasks (the env, dataset, seed and protocol."
                           f"{'/'.join(tasks)} must match); run the oracle with this eval's settings")
    return saved["summary"]["planner"]


def oracle(cfg: DictConfig) -> tuple[Oracle, EpisodeDataset]:
    """The oracle of cfg.env on the tasks of a default training run of that env: its dataset (or
    data_path), its frameskip (or model.frameskip) and its held-out split, all from configs/train.yaml."""
    if OmegaConf.select(cfg, "env.name") is None:
        raise LeworldError(f"model=oracle needs env=<{'|'.join(envs.ENVS)}>")
    training = load_config("train", [f"env={cfg.env.name}", f"scale={cfg.scale}"])
    dataset = EpisodeDataset.open(cfg.data_path or training.data.path)
    env = EnvSpec(cfg.env.name, OmegaConf.to_container(cfg.env.kwargs, resolve=True))
    frameskip = cfg.model.frameskip or training.model.frameskip
    return Oracle.of(env, dataset, frameskip, training.data.val_fraction, training.seed), dataset


def main() -> None:
    run_main("eval", run_eval)


if __name__ == "__main__":
    main()
