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

A model also carries what it was trained for, so that eval, probe and bench need nothing else:
`codec` (the ActionCodec of its action space, from its constructor) and, once trained or loaded,
`env` (name and constructor arguments) and `data` (the dataset, its fingerprint and the held-out
episodes). The checkpoint stores all three (leworld/models/__init__.py loads them).
"""

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from leworld import LeworldError
from leworld.data import ActionCodec


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


class WorldModel(nn.Module, metaclass=ABCMeta):
    def __init__(self, cfg: DictConfig | dict, codec: ActionCodec):
        """cfg: a model config (configs/model/*.yaml); codec: the action space it sees."""
        super().__init__()
        if isinstance(cfg, DictConfig):  # resolved while still inside its run config (image size: the env's)
            cfg = OmegaConf.to_container(cfg, resolve=True)
        self.cfg = OmegaConf.create(cfg)
        self.codec, self.history = codec, self.cfg.history
        self.env: EnvSpec | None = None
        self.data: DataRecord | None = None

    @property
    def frameskip(self) -> int:
        return self.codec.frameskip

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
        frames, real or imagined, and each prediction is fed back in."""
        if context.shape[1] > 1 and context_chunks is None:
            raise LeworldError("rollout from several context frames needs the action chunks taken between them")
        steps = chunks if context_chunks is None else torch.cat([context_chunks, chunks], dim=1)
        latents, first = context, context.shape[1] - 1  # `first`: index of the first imagined step
        for h in range(chunks.shape[1]):
            window = slice(max(0, first + h + 1 - self.history), first + h + 1)
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
