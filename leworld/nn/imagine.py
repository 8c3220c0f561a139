"""Imagined rollouts of the predictor (nn/predictor.py) for planning, each thing computed once.

WorldModel.rollout is the reference: at every imagined step it runs the predictor on the window of
the last `history` frames, for every candidate plan. Here, for S plans of B environments that start
from the same context (the shapes of a planner's cost call), the same numbers come out (tests hold
them equal to float rounding) with less work:

- what the plans share is computed once per environment, not once per plan: the context frames'
  inputs, and every token of a real frame followed by an action that was taken;
- each action's modulations (its shifts, scales and gates in every block) once per plan, not once
  per window it appears in; each imagined frame's input once;
- of the last block, the window's last token alone (the only one kept; the others give it their
  keys and values), and the output projector on that token alone;
- with rotary positions, every token's keys and values once: they do not change as the window
  slides, so each imagined step costs one token (imagine_cached).

Shapes: B environments, S plans each, N = B·S rows ordered (b s), Tc context frames, H imagined
steps, W the predictor's width, D the latent's.
"""

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from leworld.nn.predictor import Predictor, window_mask


def imagine(predictor: Predictor, context: Tensor, taken: Tensor, plans: Tensor,
            readout: Callable[[Tensor], Tensor]) -> Tensor:
    """context latents (B, Tc, D); the embeddings of the actions taken between them (B, Tc − 1, W)
    and of the plans' actions (B, S, H, W); readout: the predictor's features (N, W) -> a latent
    (N, D). -> the imagined latents (N, H, D)."""
    samples = plans.shape[1]
    inputs = predictor.input(context)  # (B, Tc, W)
    taken_modulations = [block.modulations(taken) for block in predictor.blocks]  # each (B, Tc − 1, 6W)
    flat = rearrange(plans, "b s h w -> (b s) h w")
    plan_modulations = [block.modulations(flat) for block in predictor.blocks]  # each (N, H, 6W)
    step = imagine_cached if predictor.positions == "rotary" else imagine_windows
    return step(predictor, inputs, taken_modulations, plan_modulations, readout, samples)


def heads_merged(attended: Tensor) -> Tensor:
    return rearrange(attended, "b h t d -> b t (h d)")


def imagine_windows(predictor: Predictor, inputs: Tensor, taken_modulations: list[Tensor],
                    plan_modulations: list[Tensor], readout, samples: int) -> Tensor:
    """Learned positions: every step runs the window anew (its tokens sit at new places), its
    shared tokens once per environment."""
    contexts, history = inputs.shape[1], predictor.history
    positions = predictor.pos_embed[0]  # (history, W)
    frame_inputs = [repeat(inputs[:, -1], "b w -> (b s) w", s=samples)]  # from the last context frame on, per plan
    imagined = []
    for h in range(plan_modulations[0].shape[1]):
        last = contexts - 1 + h  # the frame whose next one is predicted
        first = max(0, last - history + 1)
        shared = max(0, contexts - 1 - first)  # the window's real frames followed by taken actions
        own = last - first + 1 - shared  # and the frames each plan has its own action after
        xs = inputs[:, first:contexts - 1] + positions[:shared]  # (B, P, W)
        xp = torch.stack(frame_inputs[-own:], dim=1) + positions[shared:shared + own]  # (N, Q, W)
        features = window_last_token(predictor, xs, [m[:, first:contexts - 1] for m in taken_modulations], xp,
                                     [m[:, h - own + 1:h + 1] for m in plan_modulations], samples)
        imagined.append(readout(features))
        frame_inputs.append(predictor.input(imagined[-1]))
    return torch.stack(imagined, dim=1)


def window_last_token(predictor: Predictor, xs: Tensor, shared_modulations: list[Tensor], xp: Tensor,
                      own_modulations: list[Tensor], samples: int) -> Tensor:
    """The features of a window's last token: shared tokens xs (B, P, W) first, then each plan's
    own xp (N, Q, W), each with its modulations per block. -> (N, W)"""
    shared, own = xs.shape[1], xp.shape[1]
    mask = torch.cat([xp.new_ones(own, shared, dtype=torch.bool),
                      torch.ones(own, own, dtype=torch.bool, device=xp.device).tril()], dim=1)  # (Q, P + Q)
    for depth, block in enumerate(predictor.blocks):
        final = depth == len(predictor.blocks) - 1
        q, k, v = block.attn.heads_of(block.attention_input(xp, own_modulations[depth]))  # (N, heads, Q, d)
        if shared:
            qs, ks, vs = block.attn.heads_of(block.attention_input(xs, shared_modulations[depth]))
            k, v = torch.cat([ks.repeat_interleave(samples, 0), k], 2), torch.cat([vs.repeat_interleave(samples, 0), v], 2)
            if not final:  # the shared tokens' next layer; after the last they are not needed
                attended = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
                xs = block.finish(xs, block.attn.proj(heads_merged(attended)), shared_modulations[depth])
        modulations, rows = own_modulations[depth], mask
        if final:  # the last token alone
            q, xp, modulations, rows = q[:, :, -1:], xp[:, -1:], modulations[:, -1:], mask[-1:]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=rows)
        xp = block.finish(xp, block.attn.proj(heads_merged(attended)), modulations)
    return predictor.norm(xp[:, -1])


def imagine_cached(predictor: Predictor, inputs: Tensor, taken_modulations: list[Tensor],
                   plan_modulations: list[Tensor], readout, samples: int) -> Tensor:
    """Rotary positions: each frame's keys and values in every block are computed once and kept;
    each step runs one new token per plan through the blocks."""
    contexts, history, blocks = inputs.shape[1], predictor.history, predictor.blocks
    shared_keys, shared_values = shared_context(predictor, inputs[:, :-1], taken_modulations)
    own_keys, own_values = [[] for _ in blocks], [[] for _ in blocks]  # per block, (N, heads, 1, d) per own frame
    x = repeat(inputs[:, -1], "b w -> (b s) 1 w", s=samples)  # the last context frame, followed by each plan's action
    imagined = []
    for h in range(plan_modulations[0].shape[1]):
        frame = contexts - 1 + h
        first = max(0, frame - history + 1)  # the window's first frame
        position = torch.tensor([frame], device=x.device)
        for depth, block in enumerate(blocks):
            modulations = plan_modulations[depth][:, h:h + 1]
            q, k, v = block.attn.heads_of(block.attention_input(x, modulations), position)
            own_keys[depth].append(k)
            own_values[depth].append(v)
            start = max(0, first - (contexts - 1))  # the first own frame inside the window
            keys = torch.cat([shared_keys[depth][:, :, first:].repeat_interleave(samples, 0), *own_keys[depth][start:]], 2)
            values = torch.cat([shared_values[depth][:, :, first:].repeat_interleave(samples, 0),
                                *own_values[depth][start:]], 2)
            attended = F.scaled_dot_product_attention(q, keys, values)  # every key is in the window
            x = block.finish(x, block.attn.proj(heads_merged(attended)), modulations)
        imagined.append(readout(predictor.norm(x[:, 0])))
        x = predictor.input(imagined[-1])[:, None]
    return torch.stack(imagined, dim=1)


def shared_context(predictor: Predictor, xs: Tensor, modulations: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The keys and values, in every block, of the context frames followed by taken actions: xs
    (B, P, W) -> per block (B, heads, P, d) twice. Once per environment."""
    if not xs.shape[1]:  # one context frame: nothing shared
        heads = predictor.blocks[0].attn.heads
        empty = xs.new_zeros(xs.shape[0], heads, 0, xs.shape[-1] // heads)
        return [empty] * len(predictor.blocks), [empty] * len(predictor.blocks)
    frames = torch.arange(xs.shape[1], device=xs.device)
    mask = window_mask(frames, frames, predictor.history)
    keys, values = [], []
    for block, modulation in zip(predictor.blocks, modulations):
        q, k, v = block.attn.heads_of(block.attention_input(xs, modulation), frames)
        keys.append(k)
        values.append(v)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        xs = block.finish(xs, block.attn.proj(heads_merged(attended)), modulation)
    return keys, values
