"""LeWorldModel: shapes, causality, AdaLN-zero, rollouts against one-step predictions, plan costs,
and checkpoints that load without unpickling anything."""

import pickle

import pytest
import torch
from einops import rearrange

from leworld import LeworldError
from leworld.models.lewm import LeWorldModel
from conftest import codec

TINY = {
    "image_size": 32, "history": 3, "frameskip": 2, "latent_dim": 16,
    "encoder": {"backbone": {"name": "convnet", "widths": [8, 16], "depths": [1, 1], "stem": "small"},
                "projector": {"hidden": [32]}, "init": None, "freeze": False},
    "predictor": {"width": 16, "depth": 2, "heads": 2, "mlp_hidden": 32, "dropout": 0.0, "projector": {"hidden": [32]}},
    "sigreg": {"weight": 0.09, "num_slices": 32, "knots": 17, "t_max": 3.0},
}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LeWorldModel(TINY, codec()).eval()


def perturb_modulation(model):
    with torch.no_grad():
        for block in model.predictor.blocks:
            block.modulation.weight.normal_(0, 0.5)


def test_shapes_and_loss(model):
    batch = {"pixels": torch.randint(0, 255, (5, 4, 3, 32, 32), dtype=torch.uint8), "actions": torch.randn(5, 4, 4)}
    latents = model.encode(batch["pixels"])
    assert latents.shape == (5, 4, 16)
    assert model.predict(latents[:, :3], batch["actions"][:, :3]).shape == (5, 3, 16)
    out = model.loss(batch)
    torch.testing.assert_close(out["loss"], out["pred"] + 0.09 * out["sigreg"])
    predicted = model.predict(latents[:, :3], batch["actions"][:, :3])
    torch.testing.assert_close(out["pred"], (predicted - latents[:, 1:]).square().mean())
    # frames of another size are resized to the model's
    assert model.encode(torch.randint(0, 255, (2, 1, 3, 48, 48), dtype=torch.uint8)).shape == (2, 1, 16)


def test_sigreg_takes_every_frame_of_the_batch_at_once_with_pool_time():
    """LeWM's SIGReg is a sample per time step over the batch; pool_time makes it one sample of all
    B·T frames (the statistic is N-scaled: 4x the rows see latents that fill few dimensions 4x as
    clearly). The same directions score both, so each is the statistic of its own sample."""
    batch = {"pixels": torch.randint(0, 255, (5, 4, 3, 32, 32), dtype=torch.uint8), "actions": torch.randn(5, 4, 4)}
    for pooled in (False, True):
        torch.manual_seed(0)
        model = LeWorldModel({**TINY, "sigreg": {**TINY["sigreg"], "pool_time": pooled}}, codec()).eval()
        latents = model.encode(batch["pixels"])  # (5, 4, 16)
        sample = latents.reshape(20, 16) if pooled else latents.transpose(0, 1)  # (20, D) or (4, 5, D)
        torch.testing.assert_close(model.loss(batch)["sigreg"], model.sigreg(sample))
    by_step = LeWorldModel(TINY, codec()).eval()  # before the option: per time step
    torch.testing.assert_close(by_step.loss(batch)["sigreg"], by_step.sigreg(by_step.encode(batch["pixels"]).transpose(0, 1)))


def test_rollout_steps_also_train_on_the_predictors_own_predictions():
    torch.manual_seed(0)
    cfg = {**TINY, "predictor": {**TINY["predictor"], "rollout_steps": 3}}
    model = LeWorldModel(cfg, codec()).eval()
    batch = {"pixels": torch.randint(0, 255, (5, 4, 3, 32, 32), dtype=torch.uint8), "actions": torch.randn(5, 4, 4)}
    out = model.loss(batch)
    # by hand: each pass reads the first real latent, then the previous pass's predictions
    latents, chunks = model.encode(batch["pixels"]), batch["actions"][:, :3]
    first = model.predict(latents[:, :3], chunks)
    second = model.predict(torch.cat([latents[:, :1], first[:, :2]], 1), chunks)
    third = model.predict(torch.cat([latents[:, :1], second[:, :2]], 1), chunks)
    errors = [(p - latents[:, 1:]).square().mean() for p in (first, second, third)]
    torch.testing.assert_close(out["pred"], sum(errors) / 3)
    assert not torch.allclose(errors[0], errors[2])  # the later passes do see imagined inputs
    # the fed predictions carry no gradient: the loss's gradient is that of teacher forcing plus
    # the later passes with their inputs held fixed
    out["pred"].backward()
    grad = model.action_encoder[0].weight.grad.clone()
    model.zero_grad()
    fixed = [first.detach(), second.detach()]
    again = [model.predict(latents[:, :3].detach(), chunks)]
    again += [model.predict(torch.cat([latents[:, :1].detach(), f[:, :2]], 1), chunks) for f in fixed]
    (sum((p - latents[:, 1:].detach()).square().mean() for p in again) / 3).backward()
    torch.testing.assert_close(model.action_encoder[0].weight.grad, grad)


def test_prediction_is_causal_in_time(model):
    perturb_modulation(model)
    latents, actions = torch.randn(2, 3, 16), torch.randn(2, 3, 4)
    base = model.predict(latents, actions)
    later_latents, later_actions = latents.clone(), actions.clone()
    later_latents[:, 2] += 1.0
    later_actions[:, 2] += 1.0
    changed = model.predict(later_latents, later_actions)
    torch.testing.assert_close(changed[:, :2], base[:, :2])  # the past does not see the future
    assert not torch.allclose(changed[:, 2], base[:, 2])


def test_adaln_zero_starts_every_block_at_identity(model):
    latents = torch.randn(2, 3, 16)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(model.predict(latents, a), model.predict(latents, b))  # actions enter only via gates
    perturb_modulation(model)
    assert not torch.allclose(model.predict(latents, a), model.predict(latents, b))


def test_rollout_feeds_predictions_back(model):
    perturb_modulation(model)
    context, past = torch.randn(3, 2, 16), torch.randn(3, 1, 4)
    plan = torch.randn(3, 4, 4)
    imagined = model.rollout(context, plan, context_chunks=past)
    assert imagined.shape == (3, 4, 16)
    # by hand: one causal pass at a time over the last `history` frames, real then imagined
    latents, steps = context, torch.cat([past, plan], 1)
    for h in range(4):
        end = 2 + h
        window = slice(max(0, end - 3), end)
        nxt = model.predict(latents[:, window], steps[:, window])[:, -1:]
        torch.testing.assert_close(imagined[:, h:h + 1], nxt)
        latents = torch.cat([latents, nxt], 1)
    with pytest.raises(LeworldError, match="needs the action chunks"):
        model.rollout(context, plan)


def test_plan_cost_is_the_distance_of_the_last_imagined_latent_to_the_goal(model):
    perturb_modulation(model)
    context, goal = torch.randn(2, 1, 16), torch.randn(2, 16)
    plans = torch.randn(2, 5, 3, 4)  # (B, S, H, fs·A)
    costs = model.plan_cost(context, goal, plans)
    assert costs.shape == (2, 5)
    final = model.rollout(context[1:], plans[1, 3:4])[:, -1]
    torch.testing.assert_close(costs[1, 3], (final[0] - goal[1]).square().sum())
    reached = model.plan_cost(context, model.rollout(context, plans[:, 0])[:, -1], plans)
    torch.testing.assert_close(reached[:, 0], torch.zeros(2), atol=1e-6, rtol=0)


def test_frozen_encoder_stays_frozen():
    cfg = {**TINY, "encoder": {**TINY["encoder"], "freeze": True}}
    model = LeWorldModel(cfg, codec()).train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.training and model.predictor.training
    assert all(p.requires_grad for p in model.projector.parameters())


def test_a_frozen_encoder_keeps_its_latents_and_trains_the_predictor_alone():
    """freeze=encoder: the backbone and the projector stay as they started (fixed latents, BatchNorm
    statistics included); a training step moves the predictor side only (the action encoder too,
    once AdaLN-zero's gates have opened)."""
    torch.manual_seed(0)
    model = LeWorldModel({**TINY, "encoder": {**TINY["encoder"], "freeze": "encoder"}}, codec()).train()
    assert {m for m in model.frozen_modules()} >= set(model.projector.modules()) | set(model.backbone.modules())
    assert not model.backbone.training and not model.projector.training and model.predictor.training
    batch = {"pixels": torch.randint(0, 255, (5, 4, 3, 32, 32), dtype=torch.uint8), "actions": torch.randn(5, 4, 4)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.loss(batch)["loss"].backward()
    optimizer.step()
    after = model.state_dict()
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert not moved & {"backbone", "projector"} and {"predictor", "out_projector"} <= moved
    with pytest.raises(LeworldError, match="freeze=projector"):
        LeWorldModel({**TINY, "encoder": {**TINY["encoder"], "freeze": "projector"}}, codec())


def test_calibrating_a_frozen_encoder_measures_its_batchnorm_statistics():
    """model.encoder.calibrate: a random-init frozen encoder's BatchNorm statistics (mean 0, variance
    1 as they start) measured on frames; its latents grow to a trainable scale and stay fixed after."""
    torch.manual_seed(0)
    cfg = {**TINY, "encoder": {**TINY["encoder"], "freeze": "encoder", "calibrate": 64}}
    model = LeWorldModel(cfg, codec()).train()
    pixels = torch.randint(0, 255, (100, 32, 32, 3), dtype=torch.uint8)  # (N, H, W, 3), as datasets hold them
    clip = rearrange(pixels[:8], "(b t) h w c -> b t c h w", t=4)
    before = model.encode(clip)
    model.calibrate_norms(pixels, 64)
    after = model.encode(clip)
    norms = [m for m in model.projector.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert all(int(m.num_batches_tracked) == 1 and m.momentum == 0.1 for m in norms)  # 64 frames: one batch
    assert after.std() > 2 * before.std()
    seen = []  # what the projector's BatchNorm puts out on the calibration frames: standardised now
    norms[0].register_forward_hook(lambda module, inputs, output: seen.append(output))
    model.encode(rearrange(pixels[torch.linspace(0, 99, 64).long()], "n h w c -> n 1 c h w"))
    assert seen[0].mean(0).abs().max() < 0.1 and 0.8 < seen[0].var(0).mean() < 1.2
    assert not model.projector.training and model.predictor.training  # still frozen, still training the rest
    torch.testing.assert_close(model.encode(clip), after)
    with pytest.raises(LeworldError, match="calibrate=64 sets the statistics of a frozen encoder"):
        LeWorldModel({**TINY, "encoder": {**TINY["encoder"], "calibrate": 64}}, codec())


def test_loading_a_checkpoint_never_unpickles(tmp_path, monkeypatch, model):
    from leworld.checkpoint import save_checkpoint

    from leworld.models import DataRecord, EnvSpec, load_world_model, record

    model.env, model.data = EnvSpec("pusht", {"image_size": 32}), DataRecord("data", 10, "abc", (1, 2))
    save_checkpoint(tmp_path / "checkpoint.safetensors", {f"model.{k}": v for k, v in model.state_dict().items()},
                    {"model": TINY}, kind="world_model", **record(model))

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_world_model(tmp_path)
    pixels = torch.randint(0, 255, (2, 1, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(loaded.encode(pixels), model.encode(pixels))
    assert loaded.codec == model.codec and loaded.env == model.env and loaded.data == model.data
    save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(1)}, {}, kind="pretrain")
    with pytest.raises(LeworldError, match="not a world model"):
        load_world_model(tmp_path / "other.safetensors")


def test_shift_augments_training_only():
    torch.manual_seed(0)
    shifted = LeWorldModel({**TINY, "encoder": {**TINY["encoder"], "shift": 3}}, codec())
    plain = LeWorldModel(TINY, codec())
    plain.load_state_dict(shifted.state_dict())
    batch = {"pixels": torch.randint(0, 255, (4, 4, 3, 32, 32), dtype=torch.uint8), "actions": torch.randn(4, 4, 4)}
    shifted.eval(), plain.eval()
    torch.testing.assert_close(shifted.loss(batch)["pred"], plain.loss(batch)["pred"])  # evaluation sees the frames as they are
    shifted.train(), plain.train()
    torch.manual_seed(1)
    assert shifted.loss(batch)["pred"].item() != plain.loss(batch)["pred"].item()


def test_proprioception_is_fused_into_the_latent_and_trained():
    torch.manual_seed(0)
    model = LeWorldModel({**TINY, "proprio": {"use": True, "width": 8, "dim": 3}}, codec())
    pixels = torch.randint(0, 255, (4, 4, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(LeworldError, match="trained with proprioception"):
        model.encode(pixels)
    model.eval()
    still, moved = model.encode(pixels, torch.zeros(4, 4, 3)), model.encode(pixels, torch.ones(4, 4, 3))
    assert not torch.allclose(still, moved)  # the same frames, another proprioception: another latent
    model.train()
    model.loss({"pixels": pixels, "actions": torch.randn(4, 4, 4), "proprio": torch.randn(4, 4, 3)})["loss"].backward()
    assert model.proprio_encoder[0].weight.grad.abs().sum() > 0
    assert "proprio_mean" in model.state_dict()  # its statistics travel with the weights
