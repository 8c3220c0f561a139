"""Image LeJEPA learns: a short CPU run on generated shapes gives frozen features that a linear
probe and k-NN classify far better than the same backbone at its random initialisation, while
SIGReg falls from near its collapse value toward the Gaussian floor."""

import json

import pytest
import torch

from leworld.pretrain import LeJEPA, pretrain
from leworld.runtime import load_config


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    cfg = load_config("pretrain", [
        "logger=none", f"run_dir={run_dir}", "data.per_class=200", "backbone.widths=[8,16,32,64]",
        "train.epochs=15", "train.log_every=1",  # 150 steps of 128 images, about 20 s on 2 cores
    ])
    results = pretrain(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, results, rows


def test_features_beat_random_initialisation(short_run):
    _, results, _ = short_run
    trained, random_init = results["eval"]["pretrained"], results["eval"]["random_init"]
    # measured over seeds 0-2 (seed=): linear probe +12 to +19 points, k-NN +6 to +14 (chance is 12.5%)
    assert trained["linear_probe"] >= random_init["linear_probe"] + 0.10
    assert trained["knn"] >= random_init["knn"] + 0.05


def test_sigreg_falls_from_near_collapse_toward_the_floor(short_run):
    cfg, _, rows = short_run
    collapse = 0.40 * cfg.train.batch_size  # SIGReg of identical embeddings
    assert rows[0]["sigreg"] > 0.5 * collapse  # a fresh encoder maps views almost to one point
    last = sum(row["sigreg"] for row in rows[-10:]) / 10
    assert last < 4.0  # the floor of an isotropic Gaussian is about 1.06
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_loss_is_the_weighted_sum_of_agreement_and_sigreg():
    cfg = load_config("pretrain", ["backbone.widths=[8,16]", "backbone.depths=[1,1]", "views.local.count=2"])
    model = LeJEPA.from_config(cfg).eval()
    global_views, local_views = torch.randn(2, 6, 3, 32, 32), torch.randn(2, 6, 3, 16, 16)
    out = model(global_views, local_views)
    z = torch.cat([model.projector(model.backbone(v)) for v in [*global_views, *local_views]]).view(4, 6, -1)
    pred = (z - z[:2].mean(0)).square().mean()
    torch.testing.assert_close(out["pred"], pred)
    lam = cfg.loss.sigreg_weight
    torch.testing.assert_close(out["loss"], (1 - lam) * out["pred"] + lam * out["sigreg"])
    assert out["features"].shape == (6, 16)
