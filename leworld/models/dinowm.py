"""DINO-WM: a world model on the frozen patch features of a pretrained ViT; the baseline that
LeWorldModel is measured against.

    tokens_t  = ViT(frame_t) patch tokens                  frozen: (P, E), 196 x 384 for ViT-S/14 at 224 px
    tokens'_t+1 = predictor([tokens_≤t ; action_t])        a ViT over the T·P tokens of up to `history`
                                                           frames, frame-causal attention, the action
                                                           embedding concatenated to every patch token
    loss      = MSE(tokens'_t+1, tokens_t+1)               teacher forcing; the encoder never trains

With proprioception (model.proprio.use, DINO-WM's default on its robot tasks) every patch token
also carries the frame's normalised proprioceptive vector (Q values): the predictor reads it and
predicts the next one, and loss and planning cost add its error weighted by model.proprio.weight.

The encoder's weights come from a DINOv2-format file (.pth or .safetensors with DINOv2's key names)
or from a leworld image-pretraining checkpoint with a ViT backbone (models/dinov2.py): nothing is
downloaded. It has
the world-model interface of LeWorldModel (encode, predict, rollout, plan_cost, loss), so the same
training loop, planners, MPC loop and evaluation run it. Shapes: B batch, T time, P patches, E
feature width, S samples, H horizon in action chunks.
"""

import torch
from einops import rearrange, repeat
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from leworld import LeworldError
from leworld.checkpoint import load_weights
from leworld.codec import ActionCodec
from leworld.models.base import WorldModel
from leworld.models.dinov2 import read_vit_weights
from leworld.nn.preprocess import normalize, resize, to_float
from leworld.nn.vit import Block, ViT


class FramePredictor(nn.Module):
    """Patch tokens (B, T, P, E) and action embeddings (B, T, A_e) -> predicted next tokens
    (B, T, P, E). Every token sees all tokens of its own and earlier frames."""

    def __init__(self, num_patches: int, token_dim: int, action_embed: int, depth: int, heads: int, head_dim: int,
                 mlp_hidden: int, history: int):
        super().__init__()
        width = token_dim + action_embed
        self.num_patches, self.history = num_patches, history
        self.pos_embed = nn.Parameter(torch.zeros(1, history * num_patches, width))  # learned, per frame and patch
        self.blocks = nn.ModuleList(Block(width, heads, mlp_hidden / width, head_dim=head_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, token_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        frame = torch.arange(history).repeat_interleave(num_patches)  # (history·P,) frame of each token
        self.register_buffer("frame_causal", frame[None, :] <= frame[:, None], persistent=False)

    def forward(self, tokens: Tensor, actions: Tensor) -> Tensor:
        b, t, p, _ = tokens.shape
        if t > self.history:
            raise LeworldError(f"the predictor takes at most {self.history} frames at once, got {t}")
        x = torch.cat([tokens, repeat(actions, "b t a -> b t p a", p=p)], dim=-1)
        x = rearrange(x, "b t p w -> b (t p) w") + self.pos_embed[:, :t * p]
        mask = self.frame_causal[:t * p, :t * p]
        for block in self.blocks:
            x = block(x, mask)
        return rearrange(self.head(self.norm(x)), "b (t p) e -> b t p e", t=t)


class DinoWorldModel(WorldModel):
    kind = "dinowm"

    def __init__(self, cfg: DictConfig | dict, codec: ActionCodec):
        """cfg: a model config (configs/model/dinowm.yaml) whose encoder architecture and proprio
        size are filled in (configure); codec: the action space it sees. The encoder starts
        random: build (training) or a checkpoint fills it."""
        super().__init__(cfg, codec)
        cfg = self.cfg
        self.image_size = cfg.image_size
        backbone = {k: v for k, v in OmegaConf.to_container(cfg.encoder.backbone).items() if k != "name"}
        self.encoder = ViT(**backbone).requires_grad_(False).eval()
        patch = self.encoder.patch_size
        if cfg.image_size % patch:
            raise LeworldError(f"model.image_size {cfg.image_size} is not a multiple of the encoder's patch size {patch}")
        self.num_patches, self.token_dim = (cfg.image_size // patch) ** 2, self.encoder.feature_dim
        # Q: proprioceptive values per frame, written into the config from the dataset by configure
        use_proprio = OmegaConf.select(cfg, "proprio.use", default=False)
        self.proprio_dim = int(cfg.proprio.dim) if use_proprio else 0
        self.proprio_weight = cfg.proprio.weight if use_proprio else 0.0
        if use_proprio:  # the training data's proprioception statistics, saved with the weights
            self.register_buffer("proprio_mean", torch.zeros(self.proprio_dim))
            self.register_buffer("proprio_std", torch.ones(self.proprio_dim))
        p = cfg.predictor
        self.action_encoder = nn.Linear(codec.block_dim, p.action_embed)
        self.predictor = FramePredictor(self.num_patches, self.token_dim + self.proprio_dim, p.action_embed, p.depth,
                                        p.heads, p.head_dim, p.mlp_hidden, cfg.history)

    @classmethod
    def configure(cls, cfg: DictConfig, dataset) -> DictConfig:
        """The encoder's architecture read from its weights file and the proprioception's size from
        the data, so that the checkpoint rebuilds the model."""
        weights = cfg.model.encoder.weights
        if weights is None:
            raise LeworldError("model=dinowm needs model.encoder.weights=<a DINOv2 .pth/.safetensors file or a "
                               "leworld image-pretraining run with a ViT>; nothing is downloaded")
        model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))  # a copy, open to new keys
        _, model_cfg.encoder.backbone = read_vit_weights(weights, cfg.model.encoder.heads)
        if cfg.model.proprio.use:
            if "proprio" not in dataset.tensors.keys():
                raise LeworldError(f"model.proprio.use=true but {dataset.path} has no proprioception; drop the override")
            model_cfg.proprio.dim = dataset.meta["proprio_dim"]
        return model_cfg

    @classmethod
    def build(cls, model_cfg: DictConfig, codec: ActionCodec, dataset) -> "DinoWorldModel":
        """The frozen encoder's weights loaded, the proprioception statistics taken from the data."""
        model = cls(model_cfg, codec)
        weights = model_cfg.encoder.weights
        load_weights(model.encoder, read_vit_weights(weights, model_cfg.encoder.heads)[0], weights)
        if model.proprio_dim:
            proprio = dataset.tensors["proprio"][:].float()  # (N, Q)
            model.proprio_mean.copy_(proprio.mean(0))
            model.proprio_std.copy_(proprio.std(0).clamp_min(1e-6))
        return model

    def frozen_modules(self) -> set[nn.Module]:
        return set(self.encoder.modules())

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen, always
        return self

    @torch.no_grad()
    def encode(self, pixels: Tensor, proprio: Tensor | None = None) -> Tensor:
        """uint8 frames (B, T, 3, H, W) and, with proprioception, raw proprio (B, T, Q) -> patch
        tokens (B, T, P, E), or (B, T, P, E + Q) with the normalised proprio on every patch."""
        frames = rearrange(pixels, "b t c h w -> (b t) c h w")
        tokens = self.encoder.forward_tokens(normalize(resize(to_float(frames), self.image_size)))[:, 1:]
        tokens = rearrange(tokens, "(b t) p e -> b t p e", b=pixels.shape[0])
        if not self.proprio_dim:
            return tokens
        if proprio is None:
            raise LeworldError("this DINO-WM was trained with proprioception (model.proprio.use): pass proprio (B, T, Q)")
        normalised = (proprio.to(tokens.dtype) - self.proprio_mean) / self.proprio_std  # (B, T, Q)
        return torch.cat([tokens, repeat(normalised, "b t q -> b t p q", p=self.num_patches)], dim=-1)

    def distance(self, tokens: Tensor, target: Tensor) -> Tensor:
        """Mean squared error over patches and channels (..., P, E [+ Q]) -> (...): the visual part,
        plus proprio.weight times the proprioceptive part."""
        visual = (tokens[..., :self.token_dim] - target[..., :self.token_dim]).square().mean((-2, -1))
        if not self.proprio_dim:
            return visual
        proprio = (tokens[..., self.token_dim:] - target[..., self.token_dim:]).square().mean((-2, -1))
        return visual + self.proprio_weight * proprio

    def predict(self, latents: Tensor, chunks: Tensor) -> Tensor:
        """Teacher forcing: tokens (B, T, P, E) and the action chunk after each frame (B, T, fs·A)
        -> predicted next tokens (B, T, P, E)."""
        return self.predictor(latents, self.action_encoder(chunks))

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch: pixels (B, T, 3, H, W) uint8, actions (B, T, fs·A), T = history + 1, and with
        proprioception proprio (B, T, Q)."""
        if self.proprio_dim and "proprio" not in batch:
            raise LeworldError("model.proprio.use=true but the dataset has no proprioception; drop the override")
        tokens = self.encode(batch["pixels"], batch.get("proprio"))  # (B, T, P, E [+ Q]), no gradient
        predicted = self.predict(tokens[:, :-1], batch["actions"][:, :-1])
        pred = self.distance(predicted, tokens[:, 1:]).mean()
        return {"loss": pred, "pred": pred}
