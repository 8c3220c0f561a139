"""Batched augmentations: exact identities at zero strength, invariants, determinism."""

import torch

from leworld.augment import (MultiCrop, color_jitter, gaussian_blur, grayscale, normalize,
                             random_resized_crop, shift_clips, to_float)
from leworld.runtime import load_config


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(b=4, size=24):
    return torch.rand(b, 3, size, size, generator=gen(1))


def test_full_crop_without_flip_is_the_identity_and_flip_mirrors():
    x = images()
    same = random_resized_crop(x, 24, (1.0, 1.0), gen(), flip=0.0, ratio=(1.0, 1.0))
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    mirrored = random_resized_crop(x, 24, (1.0, 1.0), gen(), flip=1.0, ratio=(1.0, 1.0))
    torch.testing.assert_close(mirrored, x.flip(-1), atol=1e-5, rtol=0)


def test_small_crops_stay_inside_the_image():
    # a ramp image: any crop of it keeps values within the ramp's range and has a smaller spread
    ramp = torch.linspace(0, 1, 32).expand(2, 3, 32, 32).contiguous()
    crops = random_resized_crop(ramp, 16, (0.05, 0.1), gen(), flip=0.0)
    assert crops.shape == (2, 3, 16, 16)
    spread = crops.amax((1, 2, 3)) - crops.amin((1, 2, 3))
    assert (spread < 0.5).all() and crops.min() >= 0 and crops.max() <= 1


def test_color_jitter_at_zero_strength_is_the_identity():
    x = images()
    torch.testing.assert_close(color_jitter(x, gen(), 0.0, 0.0, 0.0, 0.0), x, atol=1e-5, rtol=0)


def test_hue_shift_keeps_gray_and_changes_colour():
    gray = torch.full((1, 3, 4, 4), 0.4)
    torch.testing.assert_close(color_jitter(gray, gen(), 0.0, 0.0, 0.0, 0.5), gray, atol=1e-5, rtol=0)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 0.8
    assert not torch.allclose(color_jitter(red, gen(), 0.0, 0.0, 0.0, 0.5), red, atol=1e-2)


def test_grayscale_has_equal_channels():
    g = grayscale(images())
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])


def test_blur_keeps_constants_and_mean_and_varies_per_image():
    const = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([0.5, 2.0])), const)
    x = images(2, 16)
    blurred = gaussian_blur(x, torch.tensor([1e-3, 2.0]))
    torch.testing.assert_close(blurred[0], x[0], atol=1e-5, rtol=0)  # a tiny sigma changes nothing
    assert blurred[1].std() < 0.6 * x[1].std()
    torch.testing.assert_close(blurred[1].mean(), x[1].mean(), atol=0.01, rtol=0)


def test_multicrop_shapes_normalisation_and_determinism():
    cfg = load_config("pretrain", ["views.local.count=6"])
    crop = MultiCrop(cfg.views, cfg.augment)
    batch = (torch.rand(5, 3, 32, 32, generator=gen(2)) * 255).to(torch.uint8)
    global_views, local_views = crop(batch, gen(3))
    assert global_views.shape == (2, 5, 3, 32, 32) and local_views.shape == (6, 5, 3, 16, 16)
    again, _ = crop(batch, gen(3))
    assert torch.equal(global_views, again)
    other, _ = crop(batch, gen(4))
    assert not torch.equal(global_views, other)
    # views are standardised images: within the ImageNet-normalised range of [0, 1]
    low, high = normalize(torch.zeros(1, 3, 1, 1)).min(), normalize(torch.ones(1, 3, 1, 1)).max()
    assert global_views.min() >= low - 1e-4 and global_views.max() <= high + 1e-4
    assert to_float(batch).max() <= 1.0


def test_shift_moves_every_frame_of_a_clip_alike_by_at_most_pad():
    b, t, size, pad = 64, 3, 16, 2
    clips = torch.zeros(b, t, 3, size, size, dtype=torch.uint8)
    clips[:, :, :, 8, 8] = 200  # one bright pixel in the middle of every frame
    clips += torch.arange(t, dtype=torch.uint8)[None, :, None, None, None]  # frames told apart by their level
    shifted = shift_clips(clips, pad, gen())
    assert shifted.shape == clips.shape and shifted.dtype == torch.uint8
    torch.testing.assert_close(shifted - shifted[:, :1], clips - clips[:, :1])  # the same shift for every frame
    where = (shifted[:, 0, 0] >= 200).nonzero()  # (b, 2): the bright pixel's row and column in each clip
    assert len(where) == b
    moves = where[:, 1:] - 8
    assert moves.abs().max() <= pad and len(set(map(tuple, moves.tolist()))) > 10  # many different shifts
    assert shift_clips(clips, 0, gen()).equal(clips)


def test_shift_repeats_the_edge_where_the_frame_slides_in():
    clips = torch.arange(8, dtype=torch.float32).repeat(8, 1)[None, None, None].expand(32, 1, 1, 8, 8)  # x ramp
    shifted = shift_clips(clips, 3, gen(2))[:, 0, 0]  # (32, 8, 8)
    steps = shifted.diff(dim=-1)
    assert set(steps.unique().tolist()) <= {0.0, 1.0}  # the ramp, or a repeated edge column
    assert shifted.min() == 0 and shifted.max() == 7
