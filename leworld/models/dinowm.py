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
or from a leworld image-pretraining checkpoint with a ViT backbone: nothing is downloaded. It has
the world-model interface of LeWorldModel (encode, predict, rollout, plan_cost, loss), so the same
training loop, planners, MPC loop and evaluation run it. Shapes: B batch, T time, P patches, E
feature width, S samples, H horizon in action chunks.
"""

import math
import pickle
from pathlib import Path

import torch
from einops import rearrange, repeat
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from leworld import LeworldError
from leworld.augment import normalize, resize, to_float
from leworld.checkpoint import FILENAME, load_checkpoint, load_weights, select
from leworld.data import ActionCodec
from leworld.models.base import WorldModel
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
    def __init__(self, cfg: DictConfig | dict, codec: ActionCodec):
        """cfg: a model config (configs/model/dinowm.yaml) whose encoder architecture and proprio
        size are filled in (dinowm_config); codec: the action space it sees. The encoder starts
        random: build_dinowm (training) or a checkpoint fills it."""
        super().__init__(cfg, codec)
        cfg = self.cfg
        self.image_size = cfg.image_size
        backbone = {k: v for k, v in OmegaConf.to_container(cfg.encoder.backbone).items() if k != "name"}
        self.encoder = ViT(**backbone).requires_grad_(False).eval()
        patch = self.encoder.patch_size
        if cfg.image_size % patch:
            raise LeworldError(f"model.image_size {cfg.image_size} is not a multiple of the encoder's patch size {patch}")
        self.num_patches, self.token_dim = (cfg.image_size // patch) ** 2, self.encoder.feature_dim
        # Q: proprioceptive values per frame, written into the config from the dataset by build_dinowm
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


def read_vit_weights(path: str | Path, heads: int | None = None) -> tuple[dict[str, Tensor], dict]:
    """A ViT state dict in leworld's names, and the ViT arguments it was made with, from a
    DINOv2-format .pth / .safetensors file (facebookresearch/dinov2's keys: patch_embed.proj.*,
    blocks.i.ls1.gamma, register_tokens, ...) or a leworld image-pretraining run with a ViT.
    Reads tensors only: .pth files are loaded with weights_only."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise LeworldError(f"encoder weights {path} do not exist; pass a DINOv2 .pth/.safetensors file or a leworld "
                           "pretraining run (nothing is downloaded)")
    try:
        if path.suffix == ".safetensors" and leworld_checkpoint(path):
            ckpt = load_checkpoint(path)
            if ckpt.info.get("kind") != "pretrain" or ckpt.config["backbone"]["name"] != "vit":
                raise LeworldError(f"{path} is a leworld checkpoint but not an image-pretraining one with a ViT backbone")
            return select(ckpt.tensors, "backbone"), ckpt.config["backbone"]
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise LeworldError(f"{path} is not a readable weights file ({type(err).__name__}: {str(err)[:100]}); it may "
                           "be truncated or corrupt") from None
    for wrapper in ("teacher", "model", "state_dict"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    if not isinstance(state, dict) or not all(k in state for k in required):
        raise LeworldError(f"{path} holds no ViT weights in DINOv2's format (it needs {', '.join(required)})")
    state = {k.replace("patch_embed.proj.", "patch_embed."): v for k, v in state.items()
             if k != "mask_token"}  # DINOv2's masked-image-modelling token is unused here
    return state, vit_config(state, heads)


def leworld_checkpoint(path: Path) -> bool:
    with open(path, "rb") as f:  # the safetensors JSON header holds leworld's metadata
        header = f.read(8 + min(int.from_bytes(f.read(8), "little"), 1 << 24))
    return b'"format":"leworld"' in header.replace(b" ", b"")


def vit_config(state: dict[str, Tensor], heads: int | None = None) -> dict:
    """The ViT arguments of a DINOv2 state dict (leworld names). Heads are not in the tensors:
    DINOv2 uses 64 channels per head, the default when `heads` is None."""
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    config = {"name": "vit", "image_size": grid * patch, "patch_size": patch, "dim": dim, "depth": depth,
              "heads": heads or max(1, dim // 64), "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / dim}
    if "blocks.0.ls1.gamma" in state:
        config["layer_scale"] = 1.0  # switches layer scale on; the loaded values replace it
    if "register_tokens" in state:
        config["registers"] = state["register_tokens"].shape[1]
    return config


def dinowm_config(cfg: DictConfig, dataset) -> DictConfig:
    """The model config a DINO-WM trains with: the encoder's architecture read from its weights
    file and the proprioception's size from the data, so that its checkpoint rebuilds it."""
    weights = cfg.model.encoder.weights
    if weights is None:
        raise LeworldError("model=dinowm needs model.encoder.weights=<a DINOv2 .pth/.safetensors file or a leworld "
                           "image-pretraining run with a ViT>; nothing is downloaded")
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))  # a copy, open to new keys
    _, model_cfg.encoder.backbone = read_vit_weights(weights, cfg.model.encoder.heads)
    if cfg.model.proprio.use:
        if "proprio" not in dataset.tensors.keys():
            raise LeworldError(f"model.proprio.use=true but {dataset.path} has no proprioception; drop the override")
        model_cfg.proprio.dim = dataset.meta["proprio_dim"]
    return model_cfg


def build_dinowm(model_cfg: DictConfig, codec: ActionCodec, dataset) -> DinoWorldModel:
    """A DINO-WM to train on `dataset` (model_cfg from dinowm_config): the frozen encoder's weights
    loaded and the proprioception statistics taken from the data."""
    model = DinoWorldModel(model_cfg, codec)
    weights = model_cfg.encoder.weights
    state, _ = read_vit_weights(weights, model_cfg.encoder.heads)
    load_weights(model.encoder, state, weights)
    if model.proprio_dim:
        proprio = dataset.tensors["proprio"][:].float()  # (N, Q)
        model.proprio_mean.copy_(proprio.mean(0))
        model.proprio_std.copy_(proprio.std(0).clamp_min(1e-6))
    return model
