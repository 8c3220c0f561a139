"""World models, chosen by `model.type`: LeWorldModel (lewm.py), the DINO-WM baseline (dinowm.py)
and stable-worldmodel's LeWM read from its checkpoints (lewm_swm.py, swm_format.py), all
WorldModels (base.py), so training, probes, planning and benchmarks take any of them.
A world-model checkpoint holds the weights, the resolved config, and what the model was trained
for: its action codec, its env and its data record (saved.py)."""

from leworld.models.base import WORLD_MODELS, DataRecord, EnvSpec, WorldModel, model_class
from leworld.models.dinowm import DinoWorldModel
from leworld.models.lewm import LeWorldModel
from leworld.models.lewm_swm import SwmLeWorldModel
from leworld.models.saved import load_world_model, model_of_checkpoint, open_dataset, open_world_model, record

__all__ = ["WORLD_MODELS", "DataRecord", "DinoWorldModel", "EnvSpec", "LeWorldModel", "SwmLeWorldModel", "WorldModel",
           "load_world_model", "model_class", "model_of_checkpoint", "open_dataset", "open_world_model", "record"]
