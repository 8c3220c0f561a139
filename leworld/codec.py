"""The action space a world model sees: raw env actions <-> normalised action chunks.

Models, planners' bounds, the clip sampler and eval all speak in chunks; this module is what they
share, with no dataset or model code behind it."""

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from torch import Tensor


@dataclass(frozen=True)
class ActionCodec:
    """Raw env actions <-> the action chunks a world model sees and plans in.

    A chunk is the `frameskip` raw actions (A each) taken between two kept frames, each normalised
    by the training data's mean and std, concatenated in time order: [a_t, a_t+1, ...] (fs·A,).
    low / high are the environment's raw action bounds. A checkpoint saves its model's codec, so
    planning searches the action space the model was trained in whatever dataset is at hand.
    """

    mean: tuple[float, ...]  # (A,)
    std: tuple[float, ...]  # (A,), at least 1e-6
    low: tuple[float, ...]  # (A,)
    high: tuple[float, ...]  # (A,)
    frameskip: int

    @classmethod
    def from_stats(cls, stats: dict, low, high, frameskip: int) -> "ActionCodec":
        """From a dataset's action statistics (meta.json's stats.action) and the env's bounds."""
        std = np.maximum(np.asarray(stats["std"], dtype=float), 1e-6)
        return cls(tuple(map(float, stats["mean"])), tuple(map(float, std)), tuple(map(float, low)),
                   tuple(map(float, high)), int(frameskip))

    @property
    def action_dim(self) -> int:
        return len(self.mean)

    @property
    def block_dim(self) -> int:
        return self.frameskip * self.action_dim

    def to_chunks(self, raw: Tensor) -> Tensor:
        """Raw actions (..., K·fs, A) -> normalised chunks (..., K, fs·A)."""
        normalised = (raw - raw.new_tensor(self.mean)) / raw.new_tensor(self.std)
        return rearrange(normalised, "... (k f) a -> ... k (f a)", f=self.frameskip)

    def to_env(self, chunks: Tensor) -> np.ndarray:
        """Normalised chunks (..., K, fs·A) -> raw actions (..., K·fs, A) inside the env's bounds."""
        normalised = rearrange(chunks.detach().float().cpu(), "... k (f a) -> ... (k f) a", f=self.frameskip).numpy()
        return np.clip(normalised * self.std + np.asarray(self.mean), self.low, self.high)

    def bounds(self, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
        """The env's bounds as normalised chunks: (low, high), each (fs·A,)."""
        low, high = (torch.tensor(v, dtype=torch.float32, device=device) for v in (self.low, self.high))
        return self.to_chunks(low.expand(self.frameskip, -1))[0], self.to_chunks(high.expand(self.frameskip, -1))[0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "ActionCodec":
        return cls(**{f.name: tuple(saved[f.name]) if f.name != "frameskip" else int(saved[f.name])
                      for f in dataclasses.fields(cls)})
