"""The simulator itself as the world model (model=oracle): what the planner and the protocol allow
at best. It has what planning needs of a model: an action codec, an env and a data record; it is
planned with SimulatorObjective."""

from dataclasses import dataclass

from leworld.codec import ActionCodec
from leworld.dataset import EpisodeDataset
from leworld.models.base import DataRecord, EnvSpec
from leworld.models.saved import tasks_of


@dataclass
class Oracle:
    codec: ActionCodec
    env: EnvSpec
    data: DataRecord
    history: int = 1

    @property
    def frameskip(self) -> int:
        return self.codec.frameskip

    @classmethod
    def of(cls, env: EnvSpec, dataset: EpisodeDataset, frameskip: int, val_fraction: float, seed: int) -> "Oracle":
        """The oracle of `env` on the tasks of `dataset`, with the action codec and held-out
        episodes a training run with that frameskip, val_fraction and seed makes."""
        codec, data = tasks_of(env, dataset, frameskip, val_fraction, seed)
        return cls(codec, env, data)
