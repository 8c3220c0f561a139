"""LeWorldModel: a JEPA world model trained end to end from pixels with two loss terms.

    z_t   = projector(backbone(frame_t))                      encoder: pixels -> latent (D)
    ẑ_t+1 = out_projector(predictor(z_≤t, action_embedding(a_≤t)))
    loss  = MSE(ẑ_t+1, z_t+1) + λ · SIGReg(z_t over the batch, per time step)

Teacher forcing, no stop-gradient, no EMA target: SIGReg alone keeps the latents from collapsing.
Pixels only by default; with model.proprio.use the agent's proprioception, embedded, joins the
backbone's features before the projector, so the latent (and all that reads it) carries it.
With `predictor.rollout_steps` = k > 1 the prediction term also averages k − 1 passes in which
the predictor reads its own earlier predictions after the first frame (as it does when planning),
without gradient through those inputs (JEPA-WMs' multi-step rollout loss); still one MSE term.
Each action a_t is the chunk of `frameskip` raw actions (normalised, leworld.codec.ActionCodec) that
moves frame t to frame t+1. Rollouts and plan costs come from WorldModel (models/base.py). Shapes:
B batch, T time, D latent width.
"""

import torch
from einops import rearrange, repeat
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from leworld import LeworldError
from leworld.augment import shift_clips
from leworld.checkpoint import load_checkpoint, load_weights, select
from leworld.codec import ActionCodec
from leworld.models.base import WorldModel
from leworld.nn.preprocess import normalize, resize, to_float
from leworld.nn import Projector, build_backbone
from leworld.nn.imagine import imagine
from leworld.nn.predictor import Predictor
from leworld.sigreg import SIGReg


class LeWorldModel(WorldModel):
    kind = "lewm"

    def __init__(self, cfg: DictConfig | dict, codec: ActionCodec):
        """cfg: a model config (configs/model/*.yaml); codec: the action space it sees."""
        super().__init__(cfg, codec)
        cfg = self.cfg
        self.image_size = cfg.image_size
        self.backbone = build_backbone(cfg.encoder.backbone)
        # proprioception (an option): its normalised values embedded and fused into the latent
        self.proprio_dim = int(cfg.proprio.dim) if OmegaConf.select(cfg, "proprio.use", default=False) else 0
        proprio_width = cfg.proprio.width if self.proprio_dim else 0
        if self.proprio_dim:  # the training data's statistics, saved with the weights
            self.register_buffer("proprio_mean", torch.zeros(self.proprio_dim))
            self.register_buffer("proprio_std", torch.ones(self.proprio_dim))
            self.proprio_encoder = nn.Sequential(nn.Linear(self.proprio_dim, proprio_width), nn.SiLU(),
                                                 nn.Linear(proprio_width, proprio_width))
        self.projector = Projector(self.backbone.feature_dim + proprio_width, list(cfg.encoder.projector.hidden),
                                   cfg.latent_dim)
        width = cfg.predictor.width
        self.action_encoder = nn.Sequential(nn.Linear(codec.block_dim, width), nn.SiLU(), nn.Linear(width, width))
        positions = cfg.predictor.get("positions", "learned")  # checkpoints from before it: learned
        self.predictor = Predictor(cfg.latent_dim, width, cfg.predictor.depth, cfg.predictor.heads,
                                   cfg.predictor.mlp_hidden, cfg.history, cfg.predictor.dropout, positions)
        if positions == "rotary":
            self.window = None  # its attention keeps to `history` frames itself: rollouts show it every frame
        self.out_projector = Projector(width, list(cfg.predictor.projector.hidden), cfg.latent_dim)
        self.sigreg = SIGReg(cfg.sigreg.num_slices, cfg.sigreg.knots, cfg.sigreg.t_max,
                             subspaces=cfg.sigreg.get("subspaces", 0))  # checkpoints from before it: 0
        self.sigreg.check_width(cfg.latent_dim)
        self.sigreg_weight = cfg.sigreg.weight
        self.sigreg_pooled = cfg.sigreg.get("pool_time", False)  # checkpoints from before it: per time step
        self.rollout_steps = cfg.predictor.get("rollout_steps", 1)  # checkpoints from before it: 1
        self.shift = cfg.encoder.get("shift", 0)  # checkpoints from before it: none
        if cfg.encoder.freeze not in (False, True, "encoder"):
            raise LeworldError(f"model.encoder.freeze={cfg.encoder.freeze}: false, true (the backbone) or encoder "
                               "(the backbone and the projector: fixed latents, only the predictor trains)")
        self.frozen = [self.backbone] if cfg.encoder.freeze else []
        if cfg.encoder.freeze == "encoder":
            self.frozen += [self.projector, *([self.proprio_encoder] if self.proprio_dim else [])]
        self.calibrate = cfg.encoder.get("calibrate", 0)  # checkpoints from before it: none
        self.metric: Tensor | None = None  # how distance measures latents in planning (eval metric=); None: L2
        if self.calibrate and not cfg.encoder.freeze:
            raise LeworldError(f"model.encoder.calibrate={cfg.encoder.calibrate} sets the statistics of a frozen "
                               "encoder: add model.encoder.freeze=encoder (or true), or drop it")
        for module in self.frozen:
            module.requires_grad_(False)
        self.train()  # modules start in training mode; this puts frozen ones in eval mode from the start

    @classmethod
    def configure(cls, cfg: DictConfig, dataset) -> DictConfig:
        """cfg.model, with the backbone of the image-pretraining run that model.encoder.init names and
        the proprioception's size (model.proprio.use) from the data. Frames are never upscaled: no
        detail is gained, and the encoder's cost grows."""
        found = dataset.meta["image_shape"][0]
        proprio = OmegaConf.select(cfg.model, "proprio.use", default=False)
        if proprio and "proprio" not in dataset.tensors.keys():
            raise LeworldError(f"model.proprio.use=true but {dataset.path} has no proprioception; drop the override")
        if cfg.model.image_size > found:
            raise LeworldError(f"model.image_size={cfg.model.image_size} but data.path={dataset.path} holds {found}-px "
                               "frames, which the encoder would upscale (no detail is gained); drop model.image_size "
                               f"(it follows the frames) or train on {cfg.model.image_size}-px frames "
                               f"(env.kwargs.image_size={cfg.model.image_size} with a new data.path)")
        if not proprio and cfg.model.encoder.init is None:
            return cfg.model
        model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))  # a copy, open to new keys
        if proprio:
            model_cfg.proprio.dim = dataset.meta["proprio_dim"]
        if cfg.model.encoder.init is None:
            return model_cfg
        ckpt = load_checkpoint(cfg.model.encoder.init)
        if ckpt.info.get("kind") != "pretrain":
            raise LeworldError(f"model.encoder.init={cfg.model.encoder.init} is a {ckpt.info.get('kind')} checkpoint, "
                               "not an image pretraining one")
        model_cfg.encoder.backbone = ckpt.config["backbone"]
        return model_cfg

    @classmethod
    def build(cls, model_cfg: DictConfig, codec: ActionCodec, dataset) -> "LeWorldModel":
        """With model.encoder.init, the backbone starts from that pretraining run's weights; with
        proprioception, its statistics come from the data."""
        model = cls(model_cfg, codec)
        if model.proprio_dim:
            proprio = dataset.tensors["proprio"][:].float()  # (N, Q)
            model.proprio_mean.copy_(proprio.mean(0))
            model.proprio_std.copy_(proprio.std(0).clamp_min(1e-6))
        if model_cfg.encoder.init is not None:
            load_weights(model.backbone, select(load_checkpoint(model_cfg.encoder.init).tensors, "backbone"),
                         model_cfg.encoder.init)
        if model.calibrate:
            proprio = dataset.tensors["proprio"] if model.proprio_dim else None
            model.calibrate_norms(dataset.tensors["pixels"], model.calibrate, proprio)
        return model

    @torch.no_grad()
    def calibrate_norms(self, pixels: Tensor, frames: int, proprio: Tensor | None = None, batch: int = 256) -> None:
        """The frozen parts' BatchNorm statistics measured on `frames` of these frames (N, H, W, 3)
        uint8 (and their raw proprio (N, Q), for a model that reads it), spread evenly; build takes
        them from the whole dataset, as the proprioception's statistics. At random init they hold
        mean 0 and variance 1, which the features do not have: fixed latents then come out so small
        (on PushT, planning costs 100x smaller than a trained encoder's) that the predictor does not
        learn their changes."""
        norms = [m for m in self.frozen_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            raise LeworldError(f"model.encoder.calibrate={frames} measures the BatchNorm statistics of the frozen "
                               "encoder, but nothing frozen has any: set model.encoder.freeze=true or encoder, or "
                               "drop model.encoder.calibrate")
        was_training, momenta = self.training, [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below, not an exponential one
            m.train()
        rows = torch.linspace(0, len(pixels) - 1, min(frames, len(pixels))).long()
        for chunk in rows.split(batch):
            self.encode(rearrange(pixels[chunk], "n h w c -> n 1 c h w"),
                        None if proprio is None else rearrange(proprio[chunk], "n q -> n 1 q"))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        self.train(was_training)

    def frozen_modules(self) -> set[nn.Module]:
        return {m for module in self.frozen for m in module.modules()}

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen:
            module.eval()  # a frozen part keeps its BatchNorm statistics too
        return self

    def encode(self, pixels: Tensor, proprio: Tensor | None = None) -> Tensor:
        """uint8 frames (B, T, 3, H, W) -> latents (B, T, D). LeWorldModel sees pixels only, unless
        trained with proprioception (model.proprio.use): then also raw proprio (B, T, Q)."""
        frames = rearrange(pixels, "b t c h w -> (b t) c h w")
        features = self.backbone(normalize(resize(to_float(frames), self.image_size)))  # (B·T, F)
        if self.proprio_dim:
            if proprio is None:
                raise LeworldError("this LeWM was trained with proprioception (model.proprio.use): pass proprio (B, T, Q)")
            normalised = (rearrange(proprio, "b t q -> (b t) q").to(features.dtype) - self.proprio_mean) / self.proprio_std
            features = torch.cat([features, self.proprio_encoder(normalised)], dim=-1)  # (B·T, F + width)
        return rearrange(self.projector(features), "(b t) d -> b t d", b=pixels.shape[0])

    def predict(self, latents: Tensor, chunks: Tensor) -> Tensor:
        """Latents (B, T, D) and the action chunk after each frame (B, T, fs·A) -> next latents (B, T, D)."""
        return self.out_projector(self.predictor(latents, self.action_encoder(chunks)))

    def plan_cost(self, context: Tensor, goal: Tensor, plans: Tensor, context_chunks: Tensor | None = None) -> Tensor:
        """WorldModel.plan_cost, the same costs with each thing computed once (leworld/nn/imagine.py).
        In training mode (dropout on) the reference rollout runs."""
        if self.training:
            return super().plan_cost(context, goal, plans, context_chunks)
        b, s = plans.shape[:2]
        if context_chunks is None:
            if context.shape[1] > 1:
                raise LeworldError("rollout from several context frames needs the action chunks taken between them")
            context_chunks = plans.new_zeros(b, 0, plans.shape[-1])
        imagined = imagine(self.predictor, context, self.action_encoder(context_chunks), self.action_encoder(plans),
                           self.out_projector)  # (B·S, H, D)
        return rearrange(self.distance(imagined[:, -1], repeat(goal, "b d -> (b s) d", s=s)), "(b s) -> b s", b=b)

    def distance(self, latents: Tensor, target: Tensor) -> Tensor:
        """Squared L2 over the latent: (..., D) x (..., D) -> (...); with `metric` A (D, D) set (eval
        metric=change, leworld/planning/metric.py), of the difference mapped by A."""
        difference = latents - target
        if self.metric is not None:
            difference = difference @ self.metric.T.to(difference.dtype)
        return difference.square().sum(-1)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch: pixels (B, T, 3, H, W) uint8 and actions (B, T, fs·A), T = history + 1."""
        pixels = batch["pixels"]
        if self.training and self.shift:
            pixels = shift_clips(pixels, self.shift)  # one shift per clip: its motion is kept
        latents = self.encode(pixels, batch.get("proprio"))  # (B, T, D)
        chunks, targets = batch["actions"][:, :-1], latents[:, 1:]  # (B, T−1, fs·A), (B, T−1, D)
        predicted = self.predict(latents[:, :-1], chunks)  # (B, T−1, D), teacher forcing
        errors = [(predicted - targets).square().mean()]  # no stop-gradient on the targets
        for _ in range(self.rollout_steps - 1):
            fed = torch.cat([latents[:, :1], predicted[:, :-1].detach()], dim=1)  # (B, T−1, D)
            predicted = self.predict(fed, chunks)
            errors.append((predicted - targets).square().mean())
        pred = torch.stack(errors).mean()
        # over the batch per time step (LeWM's), or over every frame of the batch at once (pool_time): the
        # statistic is N-scaled, so 4x the rows make it 4x as sensitive to latents that span few dimensions
        sample = "b t d -> (b t) d" if self.sigreg_pooled else "b t d -> t b d"
        sigreg = self.sigreg(rearrange(latents, sample))
        return {"loss": pred + self.sigreg_weight * sigreg, "pred": pred, "sigreg": sigreg}
