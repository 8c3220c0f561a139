"""The DINO-WM baseline: DINOv2-format weights load and reproduce DINOv2's forward pass, bad files
are one clear line, and the baseline trains and plans through the same verbs as LeWorldModel."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN, codec, run
from safetensors.torch import save_file

from leworld import LeworldError
from leworld.dataset import EpisodeDataset
from leworld.nn.preprocess import normalize, to_float
from leworld.models import DinoWorldModel, load_world_model
from leworld.models.dinowm import read_vit_weights
from leworld.pretrain import load_encoder


def dinov2_state_dict(dim=384, depth=12, heads=6, patch=14, grid=37, registers=4, seed=0) -> dict:
    """Random weights under DINOv2's key names and shapes (ViT-S/14 by default: 518-px position
    table, layer scale, register tokens and the unused mask token)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, std=0.05: torch.randn(*shape, generator=g) * std  # noqa: E731
    state = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim), "mask_token": r(1, dim),
             "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
             "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    if registers:
        state["register_tokens"] = r(1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        state |= {b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim), b + "attn.qkv.weight": r(3 * dim, dim),
                  b + "attn.qkv.bias": r(3 * dim), b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                  b + "ls1.gamma": r(dim, std=0.3), b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                  b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                  b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim), b + "ls2.gamma": r(dim, std=0.3)}
    return state


def dinov2_reference(state: dict, images: torch.Tensor, heads: int) -> torch.Tensor:
    """DINOv2's forward pass written out from its definition: normalised patch tokens (B, P, D)."""
    patch = state["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    b, d, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    table = state["pos_embed"][:, 1:].reshape(1, grid, grid, d).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(gh, gw), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, d)
    x = torch.cat([state["cls_token"].expand(b, -1, -1) + state["pos_embed"][:, :1], x + table], 1)
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    if registers:
        x = torch.cat([x[:, :1], state["register_tokens"].expand(b, -1, -1), x[:, 1:]], 1)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        p = lambda name: state[f"blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (d,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = (h @ p("attn.qkv.weight").T + p("attn.qkv.bias")).reshape(b, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1)
        out = (attention @ v).transpose(1, 2).reshape(b, -1, d) @ p("attn.proj.weight").T + p("attn.proj.bias")
        x = x + p("ls1.gamma") * out
        h = F.layer_norm(x, (d,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        h = F.gelu(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")) @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
        x = x + p("ls2.gamma") * h
    x = F.layer_norm(x, (d,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    return x[:, 1 + registers:]


def tiny_model_cfg(**backbone) -> dict:
    return {"type": "dinowm", "name": "dinowm", "image_size": 56, "history": 3, "frameskip": 2,
            "encoder": {"weights": None, "heads": None, "backbone": backbone},
            "predictor": {"depth": 1, "heads": 2, "head_dim": 16, "mlp_hidden": 64, "action_embed": 10}}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_dinov2_weights_reproduce_the_reference_forward(tmp_path, suffix):
    state = dinov2_state_dict()
    path = tmp_path / f"dinov2_vits14{suffix}"
    torch.save({"teacher": state}, path) if suffix == ".pth" else save_file(state, path)
    loaded, config = read_vit_weights(path)
    assert config == {"name": "vit", "image_size": 518, "patch_size": 14, "dim": 384, "depth": 12, "heads": 6,
                      "mlp_ratio": 4.0, "layer_scale": 1.0, "registers": 4}
    model = DinoWorldModel(tiny_model_cfg(**config), codec())
    model.encoder.load_state_dict(loaded)
    pixels = torch.randint(0, 256, (2, 1, 3, 56, 56), dtype=torch.uint8)
    tokens = model.encode(pixels)  # (2, 1, 16, 384)
    expected = dinov2_reference(state, normalize(to_float(pixels[:, 0])), heads=6)
    assert tokens.shape == (2, 1, 16, 384)
    assert torch.allclose(tokens[:, 0], expected, atol=1e-4), (tokens[:, 0] - expected).abs().max()


def test_bad_weight_files(tmp_path):
    state = dinov2_state_dict(dim=64, depth=1, heads=1, grid=4, registers=0)
    good = tmp_path / "good.pth"
    torch.save(state, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(LeworldError, match="truncated or corrupt"):
        read_vit_weights(truncated)
    safetensors = tmp_path / "truncated.safetensors"
    save_file(state, tmp_path / "whole.safetensors")
    safetensors.write_bytes((tmp_path / "whole.safetensors").read_bytes()[:3000])
    with pytest.raises(LeworldError, match="truncated or corrupt"):
        read_vit_weights(safetensors)
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(LeworldError, match="no ViT weights in DINOv2's format"):
        read_vit_weights(other)
    with pytest.raises(LeworldError, match="do not exist"):
        read_vit_weights(tmp_path / "missing.pth")
    pickled = tmp_path / "pickled.pth"
    torch.save({"cls_token": object()}, pickled)  # arbitrary objects are never unpickled
    with pytest.raises(LeworldError, match="not a readable weights file"):
        read_vit_weights(pickled)


def test_predictor_is_frame_causal():
    model = DinoWorldModel(tiny_model_cfg(name="vit", image_size=56, patch_size=14, dim=32, depth=1, heads=2), codec()).eval()
    tokens, actions = torch.randn(2, 3, 16, 32), torch.randn(2, 3, 4)
    out = model.predict(tokens, actions)
    changed = tokens.clone()
    changed[:, 2] += 1  # the last frame changes: predictions from the first two must not
    later = model.predict(changed, actions)
    assert torch.allclose(out[:, :2], later[:, :2], atol=1e-6) and not torch.allclose(out[:, 2], later[:, 2])
    costs = model.plan_cost(tokens, tokens[:, -1], torch.randn(2, 5, 2, 4), actions[:, :2])
    assert costs.shape == (2, 5) and (costs >= 0).all()


def test_baseline_trains_and_plans(data_path, trained, tmp_path):
    weights = tmp_path / "dinov2_tiny.pth"
    torch.save(dinov2_state_dict(dim=64, depth=2, heads=1, patch=8, grid=4, registers=2), weights)
    run_dir = tmp_path / "dinowm"
    tiny = [a for a in TINY_RUN if not a.startswith(("model.", "backbone"))]
    done = run("train", *tiny, "model=dinowm", f"model.encoder.weights={weights}", "model.image_size=32",
               "model.frameskip=2", "model.predictor.depth=2", "model.predictor.heads=2", "model.predictor.head_dim=16",
               "model.predictor.mlp_hidden=128", f"data.path={data_path}", "train.epochs=8", "train.lr=1e-3",
               "decode_after_training=true", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"] and "sigreg" not in rows[-1]
    model = load_world_model(run_dir)
    assert isinstance(model, DinoWorldModel) and model.num_patches == 16
    assert model.encoder.register_tokens.shape == (1, 2, 64)
    assert torch.equal(model.encoder.cls_token, torch.load(weights)["cls_token"])  # frozen: never trained

    out = tmp_path / "eval"
    done = run("eval", f"ckpt={run_dir}", "planner.samples=16", "planner.elites=4", "planner.iterations=2",
               "protocol.episodes=3", "protocol.goal_offset=10", "protocol.budget=8", "protocol.horizon=2",
               "protocol.videos=1", f"out_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads((out / "eval.json").read_text())["episodes"]["planner"]) == 3
    assert not (run_dir / "decoder").exists()  # patch tokens: no pixel decoder of one vector a frame

    surprised = run("surprise", f"ckpt={run_dir}", "clips=6", "frames=8", "event=4", "perturbations=[teleport_agent]",
                    "permutations=200", f"out_dir={tmp_path / 'surprise'}")  # through the shared interface
    assert surprised.returncode == 0, surprised.stderr[-3000:]
    teleport = json.loads((tmp_path / "surprise" / "surprise.json").read_text())["perturbations"]["teleport_agent"]
    assert teleport["before"]["control"] == teleport["before"]["perturbed"] and teleport["at"]["control"] > 0


def test_training_without_weights_is_one_line(data_path, tmp_path):
    done = run("train", *[a for a in TINY_RUN if not a.startswith(("model.", "backbone"))], "model=dinowm", f"data.path={data_path}",
               f"run_dir={tmp_path / 'x'}")
    assert done.returncode == 2 and "needs model.encoder.weights" in done.stderr.strip().splitlines()[-1]


def test_encoder_from_a_leworld_pretraining_run(tmp_path):
    run_dir = tmp_path / "pretrained"
    done = run("pretrain", "logger=none", "views.global.size=16", "views.local.size=8", "views.local.count=2",
               "train.batch_size=16", "train.epochs=1", "backbone=vit_tiny", "backbone.image_size=16",
               "backbone.patch_size=8", "backbone.dim=32", "backbone.depth=1", "backbone.heads=2",
               "projector.hidden=[32]", "projector.out_dim=16", "loss.sigreg.num_slices=32", "data.per_class=8",
               "data.size=16", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-2000:]
    state, config = read_vit_weights(run_dir)
    assert config["dim"] == 32 and config["patch_size"] == 8 and config["heads"] == 2
    model = DinoWorldModel(tiny_model_cfg(**config) | {"image_size": 32}, codec())
    model.encoder.load_state_dict(state)
    pixels = torch.randint(0, 256, (1, 1, 3, 32, 32), dtype=torch.uint8)
    expected = load_encoder(run_dir).forward_tokens(normalize(to_float(pixels[:, 0])))[:, 1:]
    assert torch.allclose(model.encode(pixels)[:, 0], expected, atol=1e-5)
    convnet = tmp_path / "convnet"
    assert run("pretrain", "logger=none", "views.global.size=16", "views.local.size=8", "views.local.count=2",
               "train.batch_size=16", "train.epochs=1", "backbone=convnet_small", "backbone.widths=[8,16]",
               "backbone.depths=[1,1]", "projector.hidden=[32]", "projector.out_dim=16",
               "loss.sigreg.num_slices=32", "data.per_class=8", "data.size=16", f"run_dir={convnet}").returncode == 0
    with pytest.raises(LeworldError, match="not an image-pretraining one with a ViT"):
        read_vit_weights(convnet)


def test_proprioception_rides_on_every_patch():
    cfg = tiny_model_cfg(name="vit", image_size=56, patch_size=14, dim=32, depth=1, heads=2)
    model = DinoWorldModel(cfg | {"proprio": {"use": True, "weight": 0.5, "dim": 3}}, codec()).eval()
    model.proprio_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    model.proprio_std.copy_(torch.tensor([2.0, 2.0, 2.0]))
    pixels = torch.randint(0, 256, (2, 1, 3, 56, 56), dtype=torch.uint8)
    tokens = model.encode(pixels, torch.tensor([[[3.0, 2.0, 1.0]], [[1.0, 2.0, 3.0]]]))  # (2, 1, 16, 32 + 3)
    assert tokens.shape == (2, 1, 16, 35)
    assert torch.equal(tokens[0, 0, :, 32:], torch.tensor([1.0, 0.0, -1.0]).expand(16, 3))  # normalised, on every patch
    pixels_only = DinoWorldModel(cfg, codec()).eval()
    pixels_only.encoder.load_state_dict(model.encoder.state_dict())
    assert torch.equal(tokens[..., :32], pixels_only.encode(pixels))  # the visual part is the encoder's tokens
    moved = tokens.clone()
    moved[..., 32:] += 2.0  # only the proprioception differs: the distance is weight x its error
    assert torch.allclose(model.distance(moved, tokens), torch.full((2, 1), 0.5 * 4.0))
    with pytest.raises(LeworldError, match="pass proprio"):
        model.encode(pixels)


def test_baseline_with_proprioception_trains_and_plans(data_path, trained, tmp_path):
    weights = tmp_path / "dinov2_tiny.pth"
    torch.save(dinov2_state_dict(dim=32, depth=1, heads=1, patch=8, grid=4, registers=0), weights)
    run_dir = tmp_path / "dinowm"
    tiny = [a for a in TINY_RUN if not a.startswith(("model.", "backbone"))]
    done = run("train", *tiny, "model=dinowm", f"model.encoder.weights={weights}", "model.image_size=32",
               "model.frameskip=2", "model.predictor.depth=1", "model.predictor.heads=2", "model.predictor.head_dim=16",
               "model.predictor.mlp_hidden=64", "model.proprio.use=true", f"data.path={data_path}", "train.epochs=4",
               "train.lr=1e-3", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    model = load_world_model(run_dir)
    proprio = EpisodeDataset.open(data_path).tensors["proprio"][:]  # TwoRoom: agent position and velocity
    assert model.proprio_dim == 4 and torch.allclose(model.proprio_mean, proprio.mean(0))

    out = tmp_path / "eval"
    done = run("eval", f"ckpt={run_dir}", "planner.samples=16", "planner.elites=4", "planner.iterations=2",
               "protocol.episodes=2", "protocol.goal_offset=10", "protocol.budget=4", "protocol.horizon=2",
               "protocol.random_baseline=false", "protocol.videos=0", f"out_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads((out / "eval.json").read_text())["episodes"]["planner"]) == 2
