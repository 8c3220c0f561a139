"""Adding a world model is one module and one config file: a model defined outside leworld
(tests/toy_world_model.py) trains, saves, loads, probes and plans through the verbs unchanged."""

import json

from conftest import TINY_RUN

from leworld.models import load_world_model
from leworld.runtime import run_main
from leworld.train import train
from toy_world_model import ToyWorldModel

TOY_CONFIG = """# @package _global_
model:
  type: toy_world_model:ToyWorldModel   # package.module:Class of a model outside leworld
  name: toy
  history: 3
  frameskip: 2
  latent_dim: 16
  pooled: 8
train:
  epochs: 6
  batch_size: 32
  lr: 3.0e-3
"""


def test_a_world_model_from_outside_leworld_trains_loads_and_plans(data_path, trained, tmp_path, capsys):
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "toy.yaml").write_text(TOY_CONFIG)
    run_dir = tmp_path / "toy"
    tiny = [a for a in TINY_RUN if not a.startswith(("model.", "backbone", "train.lr", "train.batch_size"))]
    overrides = [*tiny, f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "model=toy", f"data.path={data_path}",
                 f"run_dir={run_dir}", "plan_after_training=true", "planner.samples=16", "planner.elites=4",
                 "planner.iterations=2", "protocol.episodes=3", "protocol.goal_offset=10", "protocol.budget=8",
                 "protocol.horizon=2", "protocol.videos=0"]
    run_main("train", lambda cfg: train(cfg, overrides), overrides)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["pred"] < rows[0]["pred"]  # it learned
    model = load_world_model(run_dir)
    assert isinstance(model, ToyWorldModel) and model.env.name == "tworoom" and len(model.data.held_out) > 0
    probe = json.loads((run_dir / "probe.json").read_text())
    assert probe["rollout"]["model"][0] < probe["rollout"]["no_change"][0]
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert len(report["episodes"]["planner"]) == 3 and "random" in report["summary"]
    assert "planning success" in capsys.readouterr().out
