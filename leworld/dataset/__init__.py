"""Episode datasets: the format and its checks (format.py), the one writer (writer.py) that
collection and HDF5 import (hdf5.py) use, the reader (episodes.py) and the clip sampler (clips.py)."""

from leworld.dataset.clips import ClipSampler
from leworld.dataset.episodes import EpisodeDataset
from leworld.dataset.format import dataset_problems

__all__ = ["ClipSampler", "EpisodeDataset", "dataset_problems"]
