"""BatchNorm MLP projector.

SIGReg needs a projection head with BatchNorm: a ViT's final LayerNorm alone keeps the embeddings
from reaching an isotropic Gaussian (LeWM), so every encoder ends in one of these.
"""

from einops import pack, unpack
from torch import Tensor, nn


class Projector(nn.Module):
    """(..., in_dim) -> (..., out_dim): [Linear, BatchNorm, GELU] per hidden width, then Linear.

    BatchNorm takes its statistics over all leading dims together (batch, time or views).
    """

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int):
        super().__init__()
        layers, width = [], in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.GELU()]
            width = h
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        flat, shape = pack([x], "* d")
        (out,) = unpack(self.net(flat), shape, "* d")
        return out
