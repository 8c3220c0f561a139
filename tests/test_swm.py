"""stable-worldmodel's LeWM checkpoints in leworld (model type lewm_swm), held to stable-worldmodel
0.1.1's own LeWM, built and saved by its own code (tests/swm_reference.py); and leworld models
planning under stable-worldmodel's CEMSolver through the Costable adapter."""

import json
import pathlib
import types

import numpy as np
import pytest
import torch
from conftest import codec, run
from gymnasium.spaces import Box
from swm_reference import ENCODER, save_lewm, swm, vit_hf

from leworld import LeworldError
from leworld.bench.swm import respell
from leworld.checkpoint import load_weights, resolve_path
from leworld.dataset import EpisodeDataset
from leworld.models import SwmLeWorldModel, load_world_model
from leworld.models.swm_format import leworld_state, read_config, read_weights, vit_state
from leworld.nn import build_backbone
from leworld.nn.preprocess import normalize, to_float
from leworld.planning.swm_costable import SwmCostable
from planners.cem import CEM

FRAMESKIP, ACTION = 2, 2  # TwoRoom's actions are 2-D


def load(folder: pathlib.Path) -> SwmLeWorldModel:
    """The folder as leworld reads it, with a codec of its own (the outputs below take chunks as they are)."""
    model = SwmLeWorldModel(read_config(folder), codec(ACTION, FRAMESKIP))
    model.load_their_weights(leworld_state(read_weights(resolve_path(folder))), folder)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_lewm(tmp_path_factory.mktemp("swm"), "lewm-small", FRAMESKIP * ACTION)


def test_a_checkpoint_their_save_pretrained_wrote_computes_what_theirs_does(saved):
    theirs, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.pt"]
    ours = load(folder)
    torch.manual_seed(1)
    pixels = torch.randint(0, 256, (2, 3, 3, 28, 28), dtype=torch.uint8)  # (B, T, 3, H, W)
    chunks = torch.randn(2, 3, FRAMESKIP * ACTION)
    with torch.no_grad():
        their_latents = theirs.encode({"pixels": normalize(to_float(pixels))})["emb"]
        latents = ours.encode(pixels)
        assert latents.shape == (2, 3, 32)
        torch.testing.assert_close(latents, their_latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.predict(latents, chunks),
                                   theirs.predict(their_latents, theirs.action_encoder(chunks)), atol=1e-5, rtol=1e-5)

        plans = torch.randn(2, 7, 4, FRAMESKIP * ACTION)  # (B, S, H, fs·A)
        start, goal = pixels[:, :1], pixels[:, 2:]  # (B, 1, 3, H, W)
        # their get_cost, one task at a time: its goal latent (B, 1, D) broadcasts against (B, S, T, D) for B = 1 only
        their_costs = torch.cat([theirs.get_cost({"pixels": their_frames(start[i:i + 1], 7),
                                                  "goal": their_frames(goal[i:i + 1], 7),
                                                  "action": torch.zeros(1, 7, 1, FRAMESKIP * ACTION)}, plans[i:i + 1])
                                 for i in range(2)])
        costs = ours.plan_cost(ours.encode(start), ours.encode(goal)[:, 0], plans)
    assert costs.shape == (2, 7) and costs.std() > 0
    torch.testing.assert_close(costs, their_costs, atol=1e-4, rtol=1e-4)


def their_frames(frames: torch.Tensor, samples: int) -> torch.Tensor:
    """uint8 (B, T, 3, H, W) -> what their solvers hand get_cost: standardised, (B, S, T, 3, H, W)."""
    return normalize(to_float(frames))[:, None].expand(len(frames), samples, *frames.shape[1:])


def test_both_vit_key_spellings_load(saved, tmp_path):
    theirs, folder = saved
    other = tmp_path / "respelled"
    other.mkdir()
    (other / "config.json").write_text((folder / "config.json").read_text())
    state = respell(theirs.state_dict())
    assert set(state) != set(theirs.state_dict())
    torch.save(state, other / "weights.pt")
    pixels = torch.randint(0, 256, (1, 2, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(load(other).encode(pixels), load(folder).encode(pixels))


def test_the_encoder_interpolates_positions_as_hugging_face_does():
    """At another frame size than it was made for, the position table is resized as theirs is."""
    hf = vit_hf(**{k: v for k, v in ENCODER.items() if k not in ("_target_", "pretrained")}).eval()
    config = read_config_of({"_target_": "jepa.JEPA", "encoder": ENCODER, "predictor": {"num_frames": 1, "depth": 1,
                             "heads": 1, "mlp_dim": 8, "input_dim": 32, "hidden_dim": 32},
                             "action_encoder": {"input_dim": 2, "emb_dim": 32}})
    ours = build_backbone(config["encoder"]).eval()
    load_weights(ours, vit_state(hf.state_dict()), "hf")
    images = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        theirs = hf(images, interpolate_pos_encoding=True).last_hidden_state[:, 0]
        torch.testing.assert_close(ours(images), theirs, atol=1e-5, rtol=1e-5)


def read_config_of(config: dict, folder: pathlib.Path | None = None) -> dict:
    import tempfile
    folder = folder or pathlib.Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps(config))
    return read_config(folder)


class Touch:
    """A pickled object that, unpickled, creates a file: what a hostile weights.pt runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_hostile_and_broken_folders_are_refused_in_one_line(saved, tmp_path):
    theirs, folder = saved
    config = json.loads((folder / "config.json").read_text())
    marker = tmp_path / "ran"
    for where in ("top", "encoder", "norm"):
        hostile = json.loads(json.dumps(config))
        target = {"_target_": "os.system", "command": f"touch {marker}"}
        if where == "top":
            hostile = target | {k: v for k, v in hostile.items() if k != "_target_"}
        elif where == "encoder":
            hostile["encoder"] = target
        else:
            hostile["projector"]["norm_fn"] = target
        with pytest.raises(LeworldError, match="os.system.*runs nothing a config names"):
            read_config_of(hostile, tmp_path)
    for extra in ({"predictor": config["predictor"] | {"block_class": "x"}}, {"callbacks": [{"_target_": "os.system"}]}):
        with pytest.raises(LeworldError, match="leworld reads only"):
            read_config_of(config | extra, tmp_path)

    pickled = tmp_path / "pickled.pt"
    torch.save({"weights": Touch(marker)}, pickled)
    with pytest.raises(LeworldError, match="holds pickled objects, not a plain state dict"):
        read_weights(pickled)
    assert not marker.exists()

    state = theirs.state_dict()
    for broken, message in [({k: v for k, v in state.items() if "pred_proj" not in k}, "missing"),
                            (state | {"predictor.pos_embedding": torch.zeros(1, 5, 32)}, "does not fit")]:
        bad = tmp_path / f"bad-{message.replace(' ', '-')}"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps(config))
        torch.save(broken, bad / "weights.pt")
        with pytest.raises(LeworldError, match=message):
            load(bad)

    # through a verb: one line, exit 2, nothing written
    bad = tmp_path / "hostile-verb"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config | {"_target_": "os.system"}))
    torch.save(state, bad / "weights.pt")
    done = run("eval", f"ckpt={bad}", "env=tworoom")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "os.system" in done.stderr
    assert sorted(p.name for p in bad.iterdir()) == ["config.json", "weights.pt"] and not marker.exists()


def test_eval_probe_and_surprise_take_a_swm_checkpoint(saved, trained, data_path, tmp_path):
    """The verbs plan, probe and test surprise with their model on a leworld dataset's tasks."""
    _, folder = saved
    done = run("eval", f"ckpt={folder}", "planner.samples=16", "planner.elites=4", "planner.iterations=2",
               "protocol.episodes=3", "protocol.goal_offset=10", "protocol.budget=8", "protocol.horizon=2",
               "protocol.videos=1", f"out_dir={tmp_path / 'eval'}")
    assert done.returncode == 2 and "does not record its environment; pass env=" in done.stderr
    done = run("eval", f"ckpt={folder}", "env=tworoom", f"data_path={data_path}", "planner.samples=16",
               "planner.elites=4", "planner.iterations=2", "protocol.episodes=3", "protocol.goal_offset=10",
               "protocol.budget=8", "protocol.horizon=2", "protocol.videos=1", f"out_dir={tmp_path / 'eval'}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert len(result["episodes"]["planner"]) == 3 and list((tmp_path / "eval").glob("*.gif"))

    done = run("probe", f"ckpt={folder}", "env=tworoom", f"data_path={data_path}", "probe.frames=300",
               "probe.clips=16", "probe.horizon=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((folder / "probe.json").read_text())
    done = run("surprise", f"ckpt={folder}", "env=tworoom", f"data_path={data_path}", "clips=4", "frames=8", "event=4",
               "perturbations=[teleport_agent]", "permutations=100", f"out_dir={tmp_path / 'surprise'}")
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_leworld_model_plans_under_their_cem_as_under_leworlds(trained, data_path):
    model = load_world_model(trained[0]).requires_grad_(False)
    costable = SwmCostable(model)
    b, h = 4, 3
    dataset = EpisodeDataset.open(data_path)
    held_out = dataset.episode_starts[list(model.data.held_out)]
    starts = [first + offset for first in held_out for offset in (0, 15)][:b]  # goals 12 frames later
    pixels = dataset.tensors["pixels"]
    start = torch.stack([pixels[int(t)] for t in starts])[:, None]  # (B, T, H, W, 3) uint8, as rendered
    goal = torch.stack([pixels[int(t) + 12] for t in starts])[:, None]
    context = model.encode(start.permute(0, 1, 4, 2, 3))
    target = model.encode(goal.permute(0, 1, 4, 2, 3))[:, 0]
    plans = torch.randn(b, 9, h, model.codec.block_dim)
    info = {"pixels": start[:, None].expand(b, 9, *start.shape[1:]), "goal": goal[:, None].expand(b, 9, *goal.shape[1:])}
    torch.testing.assert_close(costable.get_cost(info, plans), model.plan_cost(context, target, plans))

    cost = lambda p: model.plan_cost(context, target, p)  # noqa: E731  (B, S, H, fs·A) -> (B, S)

    def their_plan(seed):  # stable-worldmodel's CEMSolver through the adapter -> (B, H, fs·A)
        solver = swm("solver.cem").CEMSolver(costable, batch_size=b, num_samples=64, n_steps=6, topk=8, seed=seed)
        solver.configure(action_space=Box(-np.inf, np.inf, (b, model.codec.action_dim)), n_envs=b,
                         config=types.SimpleNamespace(horizon=h, action_block=model.frameskip))
        return solver.solve({"pixels": start, "goal": goal})["actions"]

    def our_plan(seed):
        return CEM(model.codec.block_dim, samples=64, elites=8, iterations=6, std=1.0, seed=seed).plan(cost, b, h)

    # the same algorithm: from the same seed, the same samples, elites and refits, so the same plan
    torch.testing.assert_close(their_plan(0), our_plan(0))
    # from independent seeds, plans of equal cost within sampling noise (medians: a missed task is an outlier)
    theirs = torch.stack([cost(their_plan(seed)[:, None])[:, 0] for seed in range(1, 7)])  # (seeds, B)
    ours = torch.stack([cost(our_plan(seed)[:, None])[:, 0] for seed in range(11, 17)])
    random = cost(torch.randn(b, 256, h, model.codec.block_dim)).median()
    assert theirs.median() < 0.2 * random and ours.median() < 0.2 * random, (theirs, ours, random)
    assert (theirs.median() - ours.median()).abs() < 0.5 * torch.cat([theirs, ours]).median(), (theirs, ours)


def test_the_bench_times_their_cem_against_leworlds_on_one_model(saved, tmp_path):
    theirs, folder = saved
    other = tmp_path / "respelled"  # their classes load it too: the bench respells it for the installed transformers
    other.mkdir()
    (other / "config.json").write_text((folder / "config.json").read_text())
    torch.save(respell(theirs.state_dict()), other / "weights.pt")
    for checkpoint in (folder, other):
        done = run("bench", "planning", f"planning.swm={checkpoint}", "planning.environments=[2]",
                   "planning.cem.samples=8", "planning.cem.elites=2", "planning.cem.iterations=2", "planning.horizon=3",
                   "planning.repeats=1", "device=cpu", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "CEM" in line]
        assert [row.split("|")[1].strip() for row in rows] == ["leworld CEM", "stable-worldmodel CEMSolver"]
        assert "stable-worldmodel's CEMSolver takes" in done.stdout


def test_their_two_loss_terms_train_every_part(saved):
    """lewm_swm's loss (next-latent MSE + SIGReg, as le-wm trains) reaches every parameter."""
    _, folder = saved
    model = load(folder).train()
    batch = {"pixels": torch.randint(0, 256, (8, 4, 3, 28, 28), dtype=torch.uint8),
             "actions": torch.randn(8, 4, FRAMESKIP * ACTION)}
    terms = model.loss(batch)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and terms["pred"] > 0 and terms["sigreg"] > 0
    frozen = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not frozen, frozen
