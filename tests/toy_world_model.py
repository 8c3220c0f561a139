"""A world model written outside leworld, as a user would: one module and one config file
(tests/test_toy_model.py writes the config). Its encoder pools the frame to a few pixels and
projects them through an MLP; its predictor is an MLP on the last latent and the action chunk."""

import torch
from einops import rearrange
from torch import Tensor, nn

from leworld.models import WorldModel
from leworld.nn.preprocess import to_float
from leworld.sigreg import SIGReg


class ToyWorldModel(WorldModel):
    def __init__(self, cfg, codec):
        super().__init__(cfg, codec)
        width, pooled = self.cfg.latent_dim, self.cfg.pooled
        self.encoder = nn.Sequential(nn.AdaptiveAvgPool2d(pooled), nn.Flatten(), nn.Linear(3 * pooled**2, 64), nn.GELU(),
                                     nn.Linear(64, width), nn.BatchNorm1d(width))  # BatchNorm: what lets SIGReg spread it
        self.predictor = nn.Sequential(nn.Linear(width + codec.block_dim, 64), nn.GELU(), nn.Linear(64, width))
        self.sigreg = SIGReg(num_slices=32)

    def encode(self, pixels: Tensor, proprio: Tensor | None = None) -> Tensor:
        frames = rearrange(to_float(pixels), "b t c h w -> (b t) c h w")
        return rearrange(self.encoder(frames), "(b t) d -> b t d", b=pixels.shape[0])

    def predict(self, latents: Tensor, chunks: Tensor) -> Tensor:
        return latents + self.predictor(torch.cat([latents, chunks], dim=-1))  # each step from its own frame alone

    def distance(self, latents: Tensor, target: Tensor) -> Tensor:
        return (latents - target).square().sum(-1)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        latents = self.encode(batch["pixels"])
        pred = (self.predict(latents[:, :-1], batch["actions"][:, :-1]) - latents[:, 1:]).square().mean()
        sigreg = self.sigreg(rearrange(latents, "b t d -> t b d"))
        return {"loss": pred + sigreg, "pred": pred, "sigreg": sigreg}
