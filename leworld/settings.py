"""The range of every numeric setting, one table per verb: what `python -m leworld.<verb>` checks
(leworld.runtime.check_values) before it does any work, so that a value that cannot work is one
line naming the key, never a traceback later nor a run that quietly does nothing.

A rule is (type, lowest, highest): an int setting must be an integer, a float one any number;
None is no bound, Above(x) a bound the value must exceed, nullable(rule) lets the value be null;
a list's values are each checked. Relations between settings (elites <= samples, min_std <=
max_std, a crop scale's low <= high) are checked where they are used. tests/test_settings.py
checks that every numeric value of every config has a rule here.
"""

from omegaconf import DictConfig, OmegaConf

from leworld.nn.convnet import HEADS, STEMS
from leworld.nn.predictor import POSITIONS
from leworld.runtime import MAX_IMAGE_SIZE, Above, nullable, prefixed

POSITIVE, FRACTION, COUNT, SEED = (float, Above(0), None), (float, 0, 1), (int, 1, None), (int, 0, None)
IMAGE_SIZE = (int, 8, MAX_IMAGE_SIZE)

# ---- pieces several verbs share ---------------------------------------------------------------

ENV = {"kwargs.image_size": IMAGE_SIZE, "episode_length": COUNT, "expert_fraction": FRACTION,
       **{f"scale.{scale}.{key}": rule for scale in ("cpu", "gpu")
          for key, rule in (("episodes", COUNT), ("image_size", IMAGE_SIZE))}}
SIGREG = {"num_slices": COUNT, "knots": (int, 2, None), "t_max": POSITIVE, "subspaces": (int, 0, None)}
BACKBONES = {
    "vit": {"image_size": IMAGE_SIZE, "patch_size": COUNT, "dim": COUNT, "depth": COUNT, "heads": COUNT,
            "mlp_ratio": POSITIVE, "layer_scale": nullable(POSITIVE), "registers": (int, 0, None)},
    "convnet": {"widths": COUNT, "depths": COUNT, "stem": (str, STEMS), "head": (str, HEADS), "keypoints": COUNT,
                "grid": COUNT},
}
MODELS = {
    "lewm": {"image_size": IMAGE_SIZE, "history": COUNT, "frameskip": COUNT, "latent_dim": COUNT,
             "encoder.projector.hidden": COUNT, "predictor.width": COUNT, "predictor.depth": COUNT,
             "predictor.heads": COUNT, "predictor.mlp_hidden": COUNT, "predictor.dropout": (float, 0, 0.99),
             "predictor.projector.hidden": COUNT, "predictor.rollout_steps": COUNT, "sigreg.weight": (float, 0, None),
             "predictor.positions": (str, POSITIONS), "encoder.shift": (int, 0, 32), "encoder.calibrate": (int, 0, None),
             "proprio.width": COUNT, "proprio.dim": nullable(COUNT),
             **prefixed("sigreg", SIGREG)},
    "dinowm": {"image_size": IMAGE_SIZE, "history": COUNT, "frameskip": COUNT, "encoder.heads": nullable(COUNT),
               "predictor.depth": COUNT, "predictor.heads": COUNT, "predictor.head_dim": COUNT,
               "predictor.mlp_hidden": COUNT, "predictor.action_embed": COUNT, "proprio.weight": (float, 0, None),
               "proprio.dim": nullable(COUNT)},
}
PLANNERS = {
    "cem": {"samples": COUNT, "elites": COUNT, "iterations": COUNT, "std": POSITIVE},
    "mppi": {"samples": COUNT, "elites": COUNT, "iterations": COUNT, "temperature": POSITIVE, "std": POSITIVE,
             "min_std": POSITIVE, "max_std": POSITIVE},
    "gradient": {"restarts": COUNT, "steps": COUNT, "lr": POSITIVE, "std": (float, 0, None)},
    "random_actions": {},
    "prior": {"receding_horizon": nullable(COUNT)},
}
PROBE = {"frames": (int, 2, None), "sigreg_rows": (int, 2, None), "clips": COUNT, "horizon": COUNT, "ridge": (float, 0, None), "seed": SEED}
DECODER = {"widths": COUNT, "frames": COUNT, "steps": COUNT, "batch_size": COUNT, "lr": (float, Above(0), 1),
           "weight_decay": (float, 0, 1)}
IMAGINE = ("model", "simulator")  # eval's imagine: who predicts where a plan ends
METRICS = ("latent", "change")  # eval's metric: how the planning cost measures latents (leworld/planning/metric.py)
PROTOCOL = {"episodes": COUNT, "goal_offset": COUNT, "budget": COUNT, "horizon": COUNT, "receding_horizon": nullable(COUNT),
            "batch": COUNT, "videos": (int, 0, None), "cpu_rows_per_call": nullable(COUNT)}


def model(model_cfg: DictConfig) -> dict:
    """A world model's settings (under model.), its backbone's included."""
    backbone = BACKBONES.get(OmegaConf.select(model_cfg, "encoder.backbone.name"), {})
    return prefixed("model", MODELS.get(model_cfg.type, {}) | prefixed("encoder.backbone", backbone))


def planner(planner_cfg: DictConfig) -> dict:
    return prefixed("planner", PLANNERS.get(planner_cfg.name, {}))


# ---- the verbs --------------------------------------------------------------------------------

COLLECT = {"episodes": COUNT, "episode_length": COUNT, "workers": COUNT, "expert_fraction": FRACTION,
           "noise": (float, 0, None), "seed": SEED, "resize": nullable(IMAGE_SIZE), **prefixed("env", ENV)}

TRAINING = {"epochs": POSITIVE, "minutes": nullable((float, 0.01, None)), "batch_size": COUNT, "lr": (float, Above(0), 1),
            "weight_decay": (float, 0, 1), "warmup": FRACTION, "final_lr_ratio": FRACTION,
            "grad_clip": nullable((float, 0, None)), "log_every": COUNT, "val_every": COUNT, "val_batches": COUNT,
            "bn_batches": (int, 0, None), "save_every": COUNT}


def train(cfg: DictConfig) -> dict:
    backbone = prefixed("backbone", BACKBONES.get(OmegaConf.select(cfg, "backbone.name"), {}))  # a LeWM's, by its name
    return {"seed": SEED, "data.val_fraction": (float, 0, 0.99), **prefixed("train", TRAINING), **prefixed("env", ENV),
            **backbone, **model(cfg.model), **prefixed("probe", PROBE), **prefixed("decoder", DECODER),
            **prefixed("prior", PRIOR), **prefixed("protocol", PROTOCOL), **planner(cfg.planner)}


def evaluate(cfg: DictConfig) -> dict:
    rules = {"seed": SEED, "imagine": (str, IMAGINE), "metric": (str, METRICS), "metric_shrink": (float, Above(0), 1),
             **prefixed("protocol", PROTOCOL), **planner(cfg.planner)}
    if cfg.get("env") is not None:
        rules |= prefixed("env", ENV)
    if cfg.get("model") is not None:  # model=oracle
        rules |= {"model.frameskip": nullable(COUNT)}
    return rules


PROBE_VERB = prefixed("probe", PROBE)
PRIOR = {"hidden": COUNT, "steps": COUNT, "batch_size": COUNT, "lr": (float, Above(0), 1), "weight_decay": (float, 0, 1),
         "dropout": (float, 0, 0.99), "check_every": COUNT, "check_fraction": (float, Above(0), 0.5), "heads": COUNT,
         "others_weight": (float, 0, 1)}
PRIOR_VERB = {"seed": SEED, **prefixed("prior", PRIOR), **prefixed("protocol", PROTOCOL)}

SURPRISE_VERB = {"seed": SEED, "clips": (int, 2, None), "frames": (int, 3, None), "event": COUNT, "permutations": COUNT,
                 "alpha": (float, Above(0), 1)}

DECODE_VERB = {"seed": SEED, **prefixed("decoder", DECODER), "rollout.episode": (int, 0, None),
               "rollout.start": (int, 0, None), "rollout.chunks": COUNT}

PRETRAIN_DATA = {"shapes": {"per_class": COUNT, "size": IMAGE_SIZE, "seed": SEED}, "folder": {"resize": nullable(IMAGE_SIZE)},
                 "array": {}, "dataset": {}}
VIEWS = {"count": COUNT, "size": IMAGE_SIZE, "scale": (float, Above(0), 1)}


def pretrain(cfg: DictConfig) -> dict:
    return {
        "seed": SEED, "data.val_fraction": (float, 0, 0.99), **prefixed("data", PRETRAIN_DATA.get(cfg.data.kind, {})),
        **prefixed("views.global", VIEWS), **prefixed("views.local", VIEWS | {"count": (int, 0, None)}),
        "augment.flip": FRACTION, "augment.grayscale": FRACTION, "augment.solarize": FRACTION, "augment.jitter.p": FRACTION,
        **{f"augment.jitter.{k}": (float, 0, 1) for k in ("brightness", "contrast", "saturation")},
        "augment.jitter.hue": (float, 0, 0.5), "augment.blur.p": FRACTION, "augment.blur.sigma": POSITIVE,
        "projector.hidden": COUNT, "projector.out_dim": COUNT,
        "loss.sigreg_weight": FRACTION, **prefixed("loss.sigreg", SIGREG),
        "train.epochs": COUNT, "train.batch_size": COUNT, "train.lr": (float, Above(0), 1), "train.weight_decay": (float, 0, 1),
        **{f"train.weight_decay_by_backbone.{name}": (float, 0, 1) for name in BACKBONES},
        "train.warmup": FRACTION, "train.final_lr_ratio": FRACTION, "train.grad_clip": nullable((float, 0, None)),
        "train.log_every": COUNT, "train.save_every_epochs": (int, 0, None), "train.workers": (int, 0, None),
        "probe.online_lr": POSITIVE, "probe.linear_weight_decay": (float, 0, None), "probe.knn_k": COUNT,
        "probe.knn_temperature": POSITIVE, "probe.batch_size": COUNT,
        **prefixed("backbone", BACKBONES.get(cfg.backbone.name, {})),
    }


RESULTS = {"minutes": (float, 0.01, None)}  # its stages are train's and bench's, each checked by its own table

BENCH = {"sigreg.n": (int, 2, None), "sigreg.m": COUNT, "sigreg.dim": COUNT, "sigreg.knots": (int, 2, None),
         "sigreg.repeats": COUNT, "collect.image_sizes": IMAGE_SIZE, "collect.workers": COUNT, "collect.steps": COUNT,
         "sampler.episodes": COUNT, "sampler.frames": COUNT, "sampler.frameskip": COUNT, "sampler.batch_sizes": COUNT,
         "sampler.seconds": POSITIVE, "planning.environments": COUNT, "planning.context": COUNT,
         "planning.horizon": COUNT, "planning.repeats": COUNT, "planning.cpu_rows_per_call": nullable(COUNT),
         **prefixed("planning.cem", PLANNERS["cem"]),
         "train.batch_size": nullable(COUNT), "train.warmup": (int, 0, None), "train.steps": COUNT,
         "train.repeats": COUNT, "train.peak_tflops": nullable(POSITIVE)}


def bench(cfg: DictConfig) -> dict:
    """The table of `python -m leworld.bench`, with each planning model's measured share of a solve."""
    measured = {f"planning.measure.{name}.{key}": COUNT for name, part in (cfg.planning.measure or {}).items()
                if part is not None for key in part}
    return BENCH | measured
