"""What every world model is: the interface that training, probes, planners and benchmarks use.

A world model fills in four things:

    encode(pixels, proprio=None)   uint8 frames (B, T, 3, H, W) -> latents (B, T, *L)
    predict(latents, chunks)       one causal pass, teacher forcing: latents (B, T, *L) and the action
                                   chunk after each frame (B, T, fs·A) -> predicted next latents (B, T, *L);
                                   entry t depends on frames and chunks up to t only
    distance(latents, target)      (..., *L) x (..., *L) -> (...): what planning minimises
    loss(batch)                    -> {"loss", and whatever else is worth logging}

and inherits `rollout` and `plan_cost`, written once here over `predict` and `distance`. *L is
the shape of one frame's latent: (D,) for LeWorldModel, (P, E) patch tokens for DINO-WM. Shapes:
B batch, T time, S samples, H horizon in action chunks, fs·A the width of one chunk.

A model also says how it is built and trained, so that no verb branches on which model it is:
`configure` (its config, filled in from files only a run can read), `build` (an untrained model
for a dataset, with whatever pretrained weights it starts from) and `frozen_modules` (what
training leaves alone). A subclass names itself with `kind`, the `model.type` of its configs, and
is found by that name (WORLD_MODELS); a model outside leworld is named `package.module:Class`.

It carries what it was trained for, so that eval, probe and bench need nothing else: `codec` (the
ActionCodec of its action space, from its constructor) and, once trained or loaded, `env` (name
and constructor arguments) and `data` (the dataset, its fingerprint and the held-out episodes).
The checkpoint stores all three (leworld/models/saved.py).
"""

import importlib
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from leworld import LeworldError
from leworld.codec import ActionCodec

WORLD_MODELS: dict[str, type["WorldModel"]] = {}  # kind -> class, filled as subclasses are defined


@dataclass(frozen=True)
class EnvSpec:
    """The environment a model was trained on: envs.make(name, **kwargs)."""

    name: str
    kwargs: dict

    @property
    def image_size(self) -> int:
        return self.kwargs["image_size"]


@dataclass(frozen=True)
class DataRecord:
    """The dataset a model was trained on, and the episodes it never trained on."""

    path: str
    num_frames: int
    fingerprint: str  # EpisodeDataset.fingerprint(): another collection at the same path differs
    held_out: tuple[int, ...]  # episode indices kept for validation, probes and planning tasks

    @classmethod
    def of(cls, dataset, held_out) -> "DataRecord":
        """The record of an opened dataset (leworld.dataset.EpisodeDataset) and its held-out episodes."""
        return cls(str(dataset.path), dataset.meta["num_frames"], dataset.fingerprint(), tuple(int(e) for e in held_out))


class WorldModel(nn.Module, metaclass=ABCMeta):
    kind: str | None = None  # model.type of its configs

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind is not None:
            WORLD_MODELS[cls.kind] = cls

    def __init__(self, cfg: DictConfig | dict, codec: ActionCodec):
        """cfg: a model config (configs/model/*.yaml); codec: the action space it sees."""
        super().__init__()
        if isinstance(cfg, DictConfig):  # resolved while still inside its run config (image size: the env's)
            cfg = OmegaConf.to_container(cfg, resolve=True)
        self.cfg = OmegaConf.create(cfg)
        self.codec, self.history = codec, self.cfg.history
        self.window: int | None = self.history  # the latest frames `predict` is shown when imagining; None: all of them
        self.env: EnvSpec | None = None
        self.data: DataRecord | None = None

    @property
    def frameskip(self) -> int:
        return self.codec.frameskip

    # ---- how the model is built and trained (the defaults suit a model built from its config alone)

    @classmethod
    def configure(cls, cfg: DictConfig, dataset) -> DictConfig:
        """The model config a run trains with and its checkpoint rebuilds the model from: cfg.model
        (cfg: the run's config) with what only files can say filled in; refuses a dataset the model
        cannot train on (LeworldError)."""
        return cfg.model

    @classmethod
    def build(cls, model_cfg: DictConfig, codec: ActionCodec, dataset) -> "WorldModel":
        """An untrained model to train on `dataset` (an EpisodeDataset), with the pretrained weights
        it starts from loaded."""
        return cls(model_cfg, codec)

    def untrained(self, seed: int) -> "WorldModel":
        """This model's architecture at a random initialisation fixed by `seed` (the caller's random
        generators untouched), with its codec, env and data record: what training added, by comparison."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = type(self)(self.cfg, self.codec)
        fresh.env, fresh.data = self.env, self.data
        return fresh

    def frozen_modules(self) -> set[nn.Module]:
        """Modules training leaves alone (their parameters do not train, their BatchNorm statistics
        are not recalibrated)."""
        return set()

    @abstractmethod
    def encode(self, pixels: Tensor, proprio: Tensor | None = None) -> Tensor:
        """uint8 frames (B, T, 3, H, W) and, for models that read it, proprio (B, T, Q) -> (B, T, *L)."""

    @abstractmethod
    def predict(self, latents: Tensor, chunks: Tensor) -> Tensor:
        """Latents (B, T, *L) and the chunk after each frame (B, T, fs·A) -> next latents (B, T, *L)."""

    @abstractmethod
    def distance(self, latents: Tensor, target: Tensor) -> Tensor:
        """(..., *L) x (..., *L) -> (...)."""

    @abstractmethod
    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch: pixels (B, T, 3, H, W) uint8, actions (B, T, fs·A), maybe proprio -> loss terms."""

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loss: DistributedDataParallel's gradient hooks run when it is computed through here."""
        return self.loss(batch)

    def rollout(self, context: Tensor, chunks: Tensor, context_chunks: Tensor | None = None) -> Tensor:
        """Imagine H steps ahead: context latents (B, Tc, *L), the chunks to take after the last
        context frame (B, H, fs·A) and, for Tc > 1, those taken between the context frames
        (B, Tc − 1, fs·A) -> predicted latents (B, H, *L). The predictor sees the last `history`
        frames, real or imagined (`window`; None: all, for a predictor that limits what it looks at
        itself), and each prediction is fed back in. The reference a faster rollout is held to."""
        if context.shape[1] > 1 and context_chunks is None:
            raise LeworldError("rollout from several context frames needs the action chunks taken between them")
        steps = chunks if context_chunks is None else torch.cat([context_chunks, chunks], dim=1)
        latents, first = context, context.shape[1] - 1  # `first`: index of the first imagined step
        for h in range(chunks.shape[1]):
            window = slice(0 if self.window is None else max(0, first + h + 1 - self.window), first + h + 1)
            latents = torch.cat([latents, self.predict(latents[:, window], steps[:, window])[:, -1:]], dim=1)
        return latents[:, context.shape[1]:]

    def plan_cost(self, context: Tensor, goal: Tensor, plans: Tensor, context_chunks: Tensor | None = None) -> Tensor:
        """Cost of candidate plans: context latents (B, Tc, *L), goal latent (B, *L), plans
        (B, S, H, fs·A) and, for Tc > 1, the chunks taken between the context frames (B, Tc − 1,
        fs·A) -> distance of each plan's last imagined latent to the goal (B, S). Context and goal
        come encoded: a planner calls this every iteration, the encoder runs once per solve."""
        b, s = plans.shape[:2]
        context = repeat(context, "b t ... -> (b s) t ...", s=s)
        if context_chunks is not None:
            context_chunks = repeat(context_chunks, "b t a -> (b s) t a", s=s)
        final = self.rollout(context, rearrange(plans, "b s h a -> (b s) h a"), context_chunks)[:, -1]
        return rearrange(self.distance(final, repeat(goal, "b ... -> (b s) ...", s=s)), "(b s) -> b s", b=b)


def model_class(kind: str) -> type[WorldModel]:
    """The world model of a `model.type`: a leworld model's name (WORLD_MODELS), or
    `package.module:Class` for one defined outside leworld (its module is imported)."""
    if ":" in kind:
        module, _, name = kind.partition(":")
        try:
            found = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise LeworldError(f"model.type={kind}: {err}; name an importable package.module:Class") from None
        if not (isinstance(found, type) and issubclass(found, WorldModel)):
            raise LeworldError(f"model.type={kind} is not a leworld.models.WorldModel")
        return found
    if kind not in WORLD_MODELS:
        raise LeworldError(f"model.type={kind} is not a world model leworld knows ({', '.join(WORLD_MODELS)}, or "
                           "package.module:Class for your own)")
    return WORLD_MODELS[kind]
