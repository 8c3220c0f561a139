"""Seeing what a world model understands: surprise at impossible events (leworld/surprise.py), a
pixel decoder of its frozen latents (leworld/decode.py) and the pictures the verbs write
(leworld/plots.py), on the session's tiny TwoRoom run and real environments."""

import json
import struct

import numpy as np
import pytest

import envs
from tests.conftest import community_missing, run


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG file, from its header; fails on anything that is not a PNG."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def one_line_error(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    return lines[0]


def test_effective_dimensions_count_the_directions_latents_fill():
    import torch

    from leworld.probe import effective_dimensions

    generator = torch.Generator().manual_seed(0)
    isotropic = torch.randn(4000, 32, generator=generator)
    assert 28 < effective_dimensions(isotropic) <= 32
    few = torch.randn(4000, 4, generator=generator) @ torch.randn(4, 32, generator=generator)  # 4 directions in 32
    assert effective_dimensions(few) < 4.01
    assert effective_dimensions(torch.cat([isotropic[:, :1] * 10, isotropic[:, 1:] * 1e-3], 1)) < 1.01


def test_sigreg_over_few_rows_hardly_sees_latents_that_fill_few_dimensions():
    """Latents in 16 of 32 dimensions, each projection of unit variance on average: at 64 rows SIGReg
    scores them near a Gaussian sample, at 2000 far above it (the statistic is N-scaled)."""
    import torch

    from leworld.probe import sigreg_by_rows

    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 16, generator=generator))[0].T  # (16, 32) orthonormal rows
    few = torch.randn(2000, 16, generator=generator) @ basis * 2**0.5  # trace 32, as an isotropic Gaussian's
    test = sigreg_by_rows(few, 64, seed=0)
    assert test["all"] > 8 * test["all_gaussian"] and test["few"] < 2.5 * test["few_gaussian"]
    gaussian = sigreg_by_rows(torch.randn(2000, 32, generator=generator), 64, seed=0)
    assert gaussian["all"] < 2 and gaussian["few"] < 2


def test_the_nearest_latent_tells_which_state_entries_the_distance_keeps():
    """Latents that hold the first state entry and nothing of the second (an angle): the nearest
    training latent's error is small in the first, a random frame's in the second, angles modulo 2π."""
    import torch

    from leworld.probe import neighbour_errors

    generator = torch.Generator().manual_seed(0)
    train_state, val_state = torch.rand(2000, 2, generator=generator) * 6.28, torch.rand(300, 2, generator=generator) * 6.28
    latent = lambda s: s[:, :1] * torch.ones(1, 8)  # noqa: E731  (the second entry is not in the latent)
    errors = neighbour_errors(latent(train_state), train_state, latent(val_state), val_state, (1,), seed=0)
    assert errors["nearest"][0] < 0.05 * errors["random"][0]
    assert 1.2 < errors["nearest"][1] < 1.9 and 1.2 < errors["random"][1] < 1.9  # uniform angles: π/2 apart
    assert (errors["random"] <= torch.pi).all()  # angle errors wrap: none above π


def test_a_teleport_moves_only_its_part_and_a_recolour_changes_only_how_it_looks():
    env = envs.make("pusht", image_size=64)
    rng = np.random.default_rng(0)
    state = env.sample_state(rng)
    moved = env.teleport(state, "block", rng)
    changed = np.flatnonzero(moved != state)
    assert set(changed) <= {2, 3, 4} and len(changed) >= 2  # the block's x, y (and angle), nothing else
    env.set_state(state)
    before, physical = env.render(), env.get_state()
    env.recolour("block")
    recoloured = env.render()
    np.testing.assert_array_equal(env.get_state(), physical)  # a change of look only
    differs = (recoloured != before).any(-1)
    assert 20 < differs.sum() < 0.5 * differs.size  # the block's pixels, not the whole frame
    env.recolour(None)
    env.set_state(state)
    np.testing.assert_array_equal(env.render(), before)  # as built again
    with pytest.raises(envs.EnvError, match="has no part 'wheel' to teleport; its parts: agent, block"):
        env.teleport(state, "wheel", rng)
    env.close()


@pytest.mark.parametrize("name", ["tworoom", "reacher", "cube"])
def test_every_part_of_every_env_teleports_and_recolours(name):
    env, rng = envs.make(name, image_size=32), np.random.default_rng(1)
    state = env.sample_state(rng)
    for part, entries in env.parts.items():
        moved = env.teleport(state, part, rng)
        assert set(np.flatnonzero(moved != state)) <= set(entries) and not np.array_equal(moved, state)
        env.set_state(state)
        before = env.render()
        env.recolour(part)
        assert (env.render() != before).any()
        env.recolour(None)
    env.close()


@pytest.mark.skipif(community_missing() is not None, reason="needs the community extra")
def test_gym_pusht_teleports_but_says_it_cannot_recolour():
    env, rng = envs.make("gym_pusht", image_size=32), np.random.default_rng(2)
    state = env.sample_state(rng)
    assert set(np.flatnonzero(env.teleport(state, "block", rng) != state)) <= {2, 3, 4}
    with pytest.raises(envs.EnvError, match="cannot draw its parts in other colours"):
        env.recolour("block")


def test_a_teleport_surprises_the_model_at_the_event_and_not_before(trained, tmp_path):
    run_dir, _ = trained
    done = run("surprise", f"ckpt={run_dir}", "clips=24", "frames=8", "event=4", "permutations=2000",
               f"out_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "surprise.json").read_text())["perturbations"]
    assert set(saved) == {"teleport_agent", "colour_agent", "swap"}
    for name, s in saved.items():
        # the frames before the event are the same in both copies, and so is every prediction of them
        assert s["before"]["control"] == s["before"]["perturbed"] and s["before"]["p"] == 1.0, name
        assert s["frames"] == [3, 4, 5, 6, 7] and len(s["control"]["mean"]) == 5  # after a history of 3 frames
    teleport = saved["teleport_agent"]
    assert teleport["at"]["perturbed"] > 2 * teleport["at"]["control"] and teleport["at"]["p"] < 0.01
    assert teleport["significant"] is True
    assert "teleport_agent" in done.stdout and "surprised" in done.stdout
    assert png_size(tmp_path / "surprise.png") == (350 * 3, 320)


def test_surprise_refuses_what_it_cannot_do_in_one_line(trained, tmp_path):
    run_dir, _ = trained
    line = one_line_error(run("surprise", f"ckpt={run_dir}", "perturbations=[teleport_block]", f"out_dir={tmp_path}"))
    assert "perturbations=['teleport_block'] cannot be made in tworoom; it offers teleport_agent, colour_agent, swap" in line
    line = one_line_error(run("surprise", f"ckpt={run_dir}", "frames=8", "event=1", f"out_dir={tmp_path}"))
    assert "event=1 must leave the model's 3 frames of history before it" in line
    assert not (tmp_path / "surprise.json").exists()


def test_a_decoder_of_the_frozen_latents_draws_frames_better_than_the_mean_frame(trained, tmp_path):
    run_dir, _ = trained
    done = run("decode", "train", f"ckpt={run_dir}", "decoder.steps=400", "decoder.widths=[32,16,8]",
               "decoder.frames=2000")
    assert done.returncode == 0, done.stderr[-3000:]
    from leworld.checkpoint import load_checkpoint

    info = load_checkpoint(run_dir / "decoder").info
    # it starts by drawing the mean training frame (zero-initialised last layer), so every gain is learned; on 574
    # frames of a tiny model TwoRoom's agent (a few pixels) is most of what differs, and it gains 7% held out
    assert info["kind"] == "decoder" and info["held_out_mse"] < 0.97 * info["mean_frame_mse"], info
    assert info["train_mse"] < 0.95 * info["mean_frame_mse"], info
    done = run("decode", "rollout", f"ckpt={run_dir}", "rollout.chunks=6", f"out={tmp_path / 'r.gif'}")
    assert done.returncode == 0, done.stderr[-3000:]
    from PIL import Image

    gif = Image.open(tmp_path / "r.gif")
    assert gif.n_frames == 7 and gif.size == (2 * 32 * 6 + 6, 32 * 6)  # start + 6 chunks; simulator | imagined
    np.save(tmp_path / "bad.npy", np.zeros((5, 2)))  # not whole chunks of 2 steps
    line = one_line_error(run("decode", "rollout", f"ckpt={run_dir}", f"rollout.actions={tmp_path / 'bad.npy'}"))
    assert "whole chunks of 2 steps" in line


def test_a_run_writes_its_pictures_and_names_them(trained):
    run_dir, stdout = trained
    assert png_size(run_dir / "plots" / "training.png") == (1200, 350)
    assert png_size(run_dir / "plots" / "probe.png") == (1200, 300)  # x, y, vx, vy
    assert png_size(run_dir / "plots" / "rollout.png") == (500, 350)
    assert png_size(run_dir / "eval" / "eval.png") == (900, 350)
    assert (run_dir / "eval" / "imagined_0.gif").is_file()  # the decoder trained after the world model
    assert "pictures:" in stdout and str(run_dir / "plots" / "training.png") in stdout
