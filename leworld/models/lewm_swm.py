"""stable-worldmodel's LeWM behind leworld's interface (`model.type: lewm_swm`), with their forward
pass: a Hugging Face ViT-style encoder (its CLS token after the final LayerNorm; leworld's ViT with
their LayerNorm eps, which the same weights fill), a projector MLP, their action Embedder, their
AdaLN-zero predictor and pred_proj (leworld/nn/swm.py). Frames are scaled to [0, 1], standardised
with ImageNet's statistics and resized to the encoder's size, as their evaluation does; actions are
the chunks of leworld's ActionCodec, which standardises each raw action by the dataset's statistics
and concatenates `frameskip` of them, as their action_block does.

    z_t   = projector(vit(frame_t)[CLS])
    ẑ_t+1 = pred_proj(predictor(z_≤t, embedder(a_≤t)))
    cost  = ||ẑ_T − z_goal||²  (their criterion: MSE summed over the latent)

Its checkpoints are stable-worldmodel's folders (models/swm_format.py: nothing unpickled, nothing
instantiated); `load_swm_model` in models/saved.py attaches what such a folder does not record (the
env, the action codec, the dataset). The loss is theirs too (next-latent MSE + λ·SIGReg), for
fine-tuning through leworld's trainer. Shapes: B batch, T time, D latent width.
"""

from einops import rearrange
from omegaconf import DictConfig
from torch import Tensor, nn

from leworld.checkpoint import load_weights
from leworld.codec import ActionCodec
from leworld.models.base import WorldModel
from leworld.nn import build_backbone
from leworld.nn.preprocess import normalize, resize, to_float
from leworld.nn.swm import MLP, Embedder, Predictor
from leworld.sigreg import SIGReg


class SwmLeWorldModel(WorldModel):
    kind = "lewm_swm"

    def __init__(self, cfg: DictConfig | dict, codec: ActionCodec):
        super().__init__(cfg, codec)
        cfg = self.cfg
        self.image_size = cfg.image_size
        self.encoder = build_backbone(cfg.encoder)
        self.projector = MLP(**cfg.projector) if cfg.projector else nn.Identity()
        self.action_encoder = Embedder(**cfg.action_encoder)
        self.predictor = Predictor(**cfg.predictor)
        self.pred_proj = MLP(**cfg.pred_proj) if cfg.pred_proj else nn.Identity()
        sigreg = cfg.get("sigreg") or {}  # their training's: weight 0.09, 1024 slices, 17 knots
        self.sigreg = SIGReg(sigreg.get("num_slices", 1024), sigreg.get("knots", 17), sigreg.get("t_max", 3.0))
        self.sigreg_weight = sigreg.get("weight", 0.09)

    def load_their_weights(self, state: dict[str, Tensor], source) -> None:
        """Their state dict, in this model's names (swm_format.leworld_state), into this model; its
        SIGReg's step counter, leworld's own (for resuming training), is not in theirs and stays."""
        load_weights(self, state | {f"sigreg.{k}": v for k, v in self.sigreg.state_dict().items()}, source)

    def encode(self, pixels: Tensor, proprio: Tensor | None = None) -> Tensor:
        """uint8 frames (B, T, 3, H, W) -> latents (B, T, D); pixels only."""
        frames = rearrange(pixels, "b t c h w -> (b t) c h w")
        features = self.encoder(normalize(resize(to_float(frames), self.image_size)))  # (B·T, F)
        return rearrange(self.projector(features), "(b t) d -> b t d", b=pixels.shape[0])

    def predict(self, latents: Tensor, chunks: Tensor) -> Tensor:
        """Latents (B, T, D) and the chunk after each frame (B, T, fs·A) -> next latents (B, T, D)."""
        features = self.predictor(latents, self.action_encoder(chunks))  # (B, T, D)
        return rearrange(self.pred_proj(rearrange(features, "b t d -> (b t) d")), "(b t) d -> b t d", b=len(latents))

    def distance(self, latents: Tensor, target: Tensor) -> Tensor:
        """Squared L2 over the latent (their criterion): (..., D) x (..., D) -> (...)."""
        return (latents - target).square().sum(-1)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """LeWM's two terms: batch pixels (B, T, 3, H, W) uint8, actions (B, T, fs·A), T = history + 1."""
        latents = self.encode(batch["pixels"])  # (B, T, D)
        predicted = self.predict(latents[:, :-1], batch["actions"][:, :-1])  # (B, T−1, D)
        pred = (predicted - latents[:, 1:]).square().mean()
        sigreg = self.sigreg(rearrange(latents, "b t d -> t b d"))
        return {"loss": pred + self.sigreg_weight * sigreg, "pred": pred, "sigreg": sigreg}
