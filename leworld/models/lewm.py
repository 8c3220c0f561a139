"""LeWorldModel: a JEPA world model trained end to end from pixels with two loss terms.

    z_t   = projector(backbone(frame_t))                      encoder: pixels -> latent (D)
    ẑ_t+1 = out_projector(predictor(z_≤t, action_embedding(a_≤t)))
    loss  = MSE(ẑ_t+1, z_t+1) + λ · SIGReg(z_t over the batch, per time step)

Teacher forcing, no stop-gradient, no EMA target: SIGReg alone keeps the latents from collapsing.
Each action a_t is the block of `frameskip` raw actions (normalised) that moves frame t to frame
t+1. Shapes: B batch, T time, S samples, H horizon in action blocks, D latent width.
"""

import json

import torch
from einops import rearrange, repeat
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from leworld import LeworldError
from leworld.augment import normalize, resize, to_float
from leworld.nn import Projector, build_backbone
from leworld.nn.predictor import Predictor
from leworld.sigreg import SIGReg


class LeWorldModel(nn.Module):
    def __init__(self, cfg: DictConfig | dict, action_dim: int):
        """cfg: a model config (configs/model/*.yaml); action_dim: raw actions per env step."""
        super().__init__()
        cfg = OmegaConf.create(cfg)
        self.cfg, self.action_dim = cfg, action_dim
        self.image_size, self.history, self.frameskip = cfg.image_size, cfg.history, cfg.frameskip
        self.backbone = build_backbone(cfg.encoder.backbone)
        self.projector = Projector(self.backbone.feature_dim, list(cfg.encoder.projector.hidden), cfg.latent_dim)
        width = cfg.predictor.width
        self.action_encoder = nn.Sequential(nn.Linear(cfg.frameskip * action_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.predictor = Predictor(cfg.latent_dim, width, cfg.predictor.depth, cfg.predictor.heads,
                                   cfg.predictor.mlp_hidden, cfg.history, cfg.predictor.dropout)
        self.out_projector = Projector(width, list(cfg.predictor.projector.hidden), cfg.latent_dim)
        self.sigreg = SIGReg(cfg.sigreg.num_slices, cfg.sigreg.knots, cfg.sigreg.t_max)
        self.sigreg_weight = cfg.sigreg.weight
        self.frozen_backbone = bool(cfg.encoder.freeze)
        if self.frozen_backbone:
            self.backbone.requires_grad_(False)
        self.train()  # modules start in training mode; this puts a frozen backbone in eval mode from the start

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()  # a frozen backbone keeps its BatchNorm statistics too
        return self

    # ---- the interface planners and probes use -------------------------------------------------

    def encode(self, pixels: Tensor, proprio: Tensor | None = None) -> Tensor:
        """uint8 frames (B, T, 3, H, W) -> latents (B, T, D). LeWorldModel sees pixels only;
        `proprio` is there for the common interface (world models that read it take it)."""
        frames = rearrange(pixels, "b t c h w -> (b t) c h w")
        features = self.backbone(normalize(resize(to_float(frames), self.image_size)))
        return rearrange(self.projector(features), "(b t) d -> b t d", b=pixels.shape[0])

    def predict(self, latents: Tensor, actions: Tensor) -> Tensor:
        """One causal pass: latents (B, T, D) and the action blocks after each frame (B, T, fs·A) ->
        the predicted next latents (B, T, D); entry t depends on frames and actions up to t only."""
        return self.out_projector(self.predictor(latents, self.action_encoder(actions)))

    def rollout(self, context: Tensor, actions: Tensor, context_actions: Tensor | None = None) -> Tensor:
        """Imagine H steps ahead: context latents (B, Tc, D), the action blocks to take after the
        last context frame (B, H, fs·A) and, for Tc > 1, those taken between the context frames
        (B, Tc − 1, fs·A) -> predicted latents (B, H, D). The predictor sees the last `history`
        frames, real or imagined, and feeds each prediction back in."""
        if context.shape[1] > 1 and context_actions is None:
            raise LeworldError("rollout from several context frames needs the actions taken between them")
        steps = actions if context_actions is None else torch.cat([context_actions, actions], dim=1)
        embedded = self.action_encoder(steps)  # (B, Tc − 1 + H, W): every action block embedded once
        latents, first = context, context.shape[1] - 1  # `first`: index of the first imagined step
        predictions = []
        for h in range(actions.shape[1]):
            window = slice(max(0, first + h + 1 - self.history), first + h + 1)
            features = self.predictor(latents[:, window], embedded[:, window])[:, -1:]
            predictions.append(self.out_projector(features))  # (B, 1, D)
            latents = torch.cat([latents, predictions[-1]], dim=1)
        return torch.cat(predictions, dim=1)

    def plan_cost(self, context: Tensor, goal: Tensor, actions: Tensor, context_actions: Tensor | None = None) -> Tensor:
        """Cost of candidate plans: context latents (B, Tc, D), goal latent (B, D), action blocks
        (B, S, H, fs·A) and, for Tc > 1, the blocks taken between the context frames (B, Tc − 1,
        fs·A) -> squared distance of each plan's last imagined latent to the goal (B, S). Context
        and goal come encoded: a planner calls this every iteration, the encoder runs once per solve."""
        b, s = actions.shape[:2]
        context = repeat(context, "b t d -> (b s) t d", s=s)
        if context_actions is not None:
            context_actions = repeat(context_actions, "b t a -> (b s) t a", s=s)
        final = self.rollout(context, rearrange(actions, "b s h a -> (b s) h a"), context_actions)[:, -1]  # (B·S, D)
        return rearrange((final - repeat(goal, "b d -> (b s) d", s=s)).square().sum(-1), "(b s) -> b s", b=b)

    # ---- training ------------------------------------------------------------------------------

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch: pixels (B, T, 3, H, W) uint8 and actions (B, T, fs·A), T = history + 1."""
        latents = self.encode(batch["pixels"])  # (B, T, D)
        predicted = self.predict(latents[:, :-1], batch["actions"][:, :-1])  # (B, T−1, D)
        pred = (predicted - latents[:, 1:]).square().mean()  # teacher forcing, no stop-gradient
        sigreg = self.sigreg(rearrange(latents, "b t d -> t b d"))  # over the batch, per time step
        return {"loss": pred + self.sigreg_weight * sigreg, "pred": pred, "sigreg": sigreg}

    forward = loss  # so that DistributedDataParallel's gradient hooks run when it computes the loss

    # ---- checkpoints ---------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu") -> "LeWorldModel":
        """A trained LeWorldModel in eval mode (leworld.models.load_world_model takes any world model)."""
        from leworld.models import load_world_model  # the registry imports this module

        model = load_world_model(path, device)
        if not isinstance(model, cls):
            raise LeworldError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model


def load_weights(module: nn.Module, tensors: dict[str, Tensor], source) -> None:
    """Load a state dict, with one clear error when it does not fit the module."""
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise LeworldError(f"{source} does not fit the model its config describes "
                           f"(missing {json.dumps(missing[:3])}, unexpected {json.dumps(unexpected[:3])})")
