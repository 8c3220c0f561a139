"""What a run does after training: probe what the latents learned, train a pixel decoder and a
policy prior on them, plan with the model (and with the prior alone), and say what it achieved in
one table."""

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from leworld.checkpoint import FILENAME
from leworld.dataset import EpisodeDataset
from leworld.decode import draws_vectors, save_decoder, train_decoder
from leworld.models import WorldModel
from leworld.planning import LatentObjective, evaluate
from leworld.plots import plot_training
from leworld.prior import save_prior, train_prior
from leworld.probe import probe_world_model
from leworld.runtime import CONFIG_DIR, RunLog


def after_training(model: WorldModel, cfg: DictConfig, dataset: EpisodeDataset, train_episodes: np.ndarray,
                   held_out: np.ndarray, device: torch.device, run_dir: Path, log: RunLog) -> dict:
    """Probe what the latents learned, then plan with the model, as configured."""
    results = {"run_dir": str(run_dir)}
    pictures = run_dir / "plots"
    pictures.mkdir(exist_ok=True)
    results["pictures"] = [str(plot_training(run_dir / "metrics.jsonl", pictures / "training.png"))]
    model.eval()
    if cfg.probe_after_training:
        results["probe"] = probe_world_model(model, dataset, train_episodes, held_out, cfg.probe, device, say=log.print,
                                             pictures=pictures)
        (run_dir / "probe.json").write_text(json.dumps(results["probe"], indent=1))
        results["pictures"] += [str(pictures / "probe.png"), str(pictures / "rollout.png")]
    decoder = None
    if cfg.get("decode_after_training", False) and draws_vectors(model, dataset, device):  # not patch tokens
        decoder, results["decoder"] = train_decoder(model.requires_grad_(False), dataset, cfg, device, say=log.print)
        save_decoder(decoder, run_dir / FILENAME, cfg, results["decoder"])
    prior = None
    if cfg.prior_after_training and draws_vectors(model, dataset, device):
        prior, results["prior"] = train_prior(model.requires_grad_(False), dataset, cfg, device, say=log.print)
        save_prior(prior, run_dir / FILENAME, cfg, results["prior"])
    log.close()
    if cfg.plan_after_training:
        settings = {"ckpt": str(run_dir / FILENAME)}
        results["eval"] = evaluate(model.requires_grad_(False), dataset, cfg.planner, cfg.protocol, cfg.seed, device,
                                   run_dir / "eval", settings, decoder=decoder)
        results["pictures"] += results["eval"]["pictures"]
        if prior is not None:  # the same tasks, whose random-actions floor the first evaluation measured
            alone = OmegaConf.load(CONFIG_DIR / "planner" / "prior.yaml")
            protocol = OmegaConf.merge(cfg.protocol, {"random_baseline": False})
            results["eval_prior"] = evaluate(model, dataset, alone, protocol, cfg.seed, device, run_dir / "eval-prior",
                                             settings | {"prior": True}, objective=partial(LatentObjective, prior=prior),
                                             decoder=decoder)
            results["pictures"] += results["eval_prior"]["pictures"]
    return results


def outcome_table(results: dict, minutes: float) -> str:
    """What the run achieved, in one table: this model against its floor (the same encoder at
    random initialisation for the probe, random actions for planning)."""
    rows = [("training minutes", f"{results['seconds'] / 60:.1f}", ""),
            ("clips seen", f"{results['clips'] / 1000:.0f}k ({results['steps']} steps)", ""),
            ("held-out loss", f"{results.get('val_loss', float('nan')):.3f}", "")]
    if "probe" in results:
        r2 = results["probe"]["r2"]
        rows += [(f"probe R² {name}", f"{value:.3f}", f"{r2['random_init'][name]:.3f}")
                 for name, value in r2["trained"].items()]
    rate = lambda s: f"{100 * s['success_rate']:.1f}% ± {100 * s['standard_error']:.1f}%"
    if "eval" in results:
        ours, floor = results["eval"]["planner"], results["eval"].get("random")
        rows += [("planning success", rate(ours), rate(floor) if floor else ""),
                 ("median final distance", f"{ours['median_final_distance']:.3g}",
                  f"{floor['median_final_distance']:.3g}" if floor else ""),
                 ("planning s per solve", f"{ours['median_solve_seconds']:.0f}", "")]
    if "eval_prior" in results:
        alone = results["eval_prior"]["planner"]
        rows += [("policy prior alone: success", rate(alone), ""),
                 ("  median final distance", f"{alone['median_final_distance']:.3g}", ""),
                 ("  s per decision", f"{alone['median_solve_seconds']:.2f}", "")]
    rows.append(("whole command, minutes", f"{minutes:.1f}", ""))
    first, second = max(len(r[0]) for r in rows) + 2, max(len(r[1]) for r in rows) + 2
    lines = [f"what {results['run_dir']} achieved:", f"  {'':<{first}}{'this model':<{second}}random init / random actions"]
    lines += [f"  {name:<{first}}{ours:<{second}}{floor}".rstrip() for name, ours, floor in rows]
    if results.get("pictures"):
        lines += ["pictures:"] + [f"  {path}" for path in results["pictures"]]
    return "\n".join(lines)
