"""Planning at a fraction of the work: LeWM's imagined rollouts (leworld/nn/imagine.py) give the
plan costs of the straightforward rollout (WorldModel.plan_cost, the reference), for learned and
rotary positions, any number of context frames and steps; with rotary positions each imagined
step costs one token."""

import pytest
import torch
from conftest import codec
from torch.utils.flop_counter import FlopCounterMode

from leworld.models import WorldModel
from leworld.models.lewm import LeWorldModel

TINY = {"type": "lewm", "image_size": 32, "history": 3, "latent_dim": 16,
        "encoder": {"backbone": {"name": "convnet", "widths": [8, 16], "depths": [1, 1]}, "projector": {"hidden": [32]},
                    "init": None, "freeze": False},
        "predictor": {"width": 32, "depth": 3, "heads": 4, "mlp_hidden": 64, "dropout": 0.1,
                      "projector": {"hidden": [48]}, "rollout_steps": 1},
        "sigreg": {"weight": 0.1, "num_slices": 16, "knots": 17, "t_max": 3.0}}


def trained_looking(positions: str) -> LeWorldModel:
    """A LeWM whose every weight is random (AdaLN-zero starts its blocks at the identity, which
    would hide a wrong modulation), in eval mode, as planning runs it."""
    cfg = TINY | {"predictor": TINY["predictor"] | {"positions": positions}}
    model = LeWorldModel(cfg, codec())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
            elif name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("contexts, horizon", [(1, 1), (1, 5), (2, 4), (3, 1), (3, 5), (4, 6)])
def test_imagined_costs_equal_the_straightforward_rollouts(positions, contexts, horizon):
    model = trained_looking(positions)
    generator = torch.Generator().manual_seed(contexts * 10 + horizon)
    b, s, chunk = 2, 7, model.codec.block_dim
    context = torch.randn(b, contexts, 16, generator=generator)
    taken = torch.randn(b, contexts - 1, chunk, generator=generator) if contexts > 1 else None
    goal, plans = torch.randn(b, 16, generator=generator), torch.randn(b, s, horizon, chunk, generator=generator)
    with torch.no_grad():
        fast = model.plan_cost(context, goal, plans, taken)
        reference = WorldModel.plan_cost(model, context, goal, plans, taken)
    assert fast.shape == (b, s)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    assert reference.std() > 1e-2 * reference.abs().mean()  # the plans' costs differ: the comparison can fail


def test_rotary_positions_cost_one_token_a_step_and_learned_ones_less_than_the_reference():
    def flops(model, fast):
        context, taken = torch.randn(2, 3, 16), torch.randn(2, 2, model.codec.block_dim)
        plans = torch.randn(2, 50, 5, model.codec.block_dim)
        cost = model.plan_cost if fast else lambda *args: WorldModel.plan_cost(model, *args)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            cost(context, torch.randn(2, 16), plans, taken)
        return counter.get_total_flops()

    learned, rotary = trained_looking("learned"), trained_looking("rotary")
    assert flops(learned, fast=True) < 0.75 * flops(learned, fast=False)  # 12 of 15 window tokens, no re-done work
    assert flops(rotary, fast=True) < 0.4 * flops(rotary, fast=False)  # 5 tokens where the reference runs 3 + 4 + 5 + 6 + 7
