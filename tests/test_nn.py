"""Backbones and projector: shapes, position-embedding interpolation, configs, errors."""

import pytest
import torch

from leworld import LeworldError
from leworld.nn import ConvNet, Projector, ViT, build_backbone
from leworld.nn.convnet import SpatialSoftmax, coordinate_channels
from leworld.runtime import load_config


def small_vit(**kw):
    return ViT(**{"image_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "heads": 4, **kw}).eval()


def test_vit_cls_feature_and_tokens():
    vit = small_vit()
    images = torch.randn(3, 3, 32, 32)
    tokens = vit.forward_tokens(images)
    assert tokens.shape == (3, 1 + 16, 32)
    torch.testing.assert_close(vit(images), tokens[:, 0])


def test_vit_cls_sees_every_patch():
    vit = small_vit()
    images = torch.randn(1, 3, 32, 32)
    changed = images.clone()
    changed[..., 24:, 24:] += 1.0  # only the last patch
    assert not torch.allclose(vit(images), vit(changed))


def test_vit_position_embedding_interpolates_to_other_sizes():
    vit = small_vit()
    assert vit.position_embedding(4, 4) is vit.pos_embed  # native grid: the learned table itself
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    assert vit.forward_tokens(torch.randn(2, 3, 64, 48)).shape == (2, 1 + 8 * 6, 32)
    table = vit.position_embedding(8, 8)
    torch.testing.assert_close(table[:, 0], vit.pos_embed[:, 0])  # the CLS position is not resized
    # a constant table stays constant when resized
    with torch.no_grad():
        vit.pos_embed[:, 1:] = 0.5
    assert torch.allclose(vit.position_embedding(7, 3)[:, 1:], torch.tensor(0.5), atol=1e-6)


def test_vit_rejects_sizes_that_are_not_multiples_of_the_patch():
    with pytest.raises(LeworldError, match="not a multiple of the ViT patch size"):
        small_vit()(torch.randn(1, 3, 30, 32))
    with pytest.raises(LeworldError, match="not a multiple of patch_size"):
        ViT(image_size=100, patch_size=14)


@pytest.mark.parametrize("stem, size", [("small", 16), ("small", 32), ("imagenet", 64), ("stride2", 64)])
@pytest.mark.parametrize("head, features", [("average", 16), ("keypoints", 10), ("flatten", 64)])
def test_convnet_pools_any_size(stem, size, head, features):
    net = ConvNet(widths=(8, 16), depths=(1, 1), stem=stem, head=head, keypoints=5, grid=2, coords=True).eval()
    assert net.feature_dim == features
    assert net(torch.randn(2, 3, size, size)).shape == (2, features)


def test_keypoints_are_where_the_map_is_hot_and_coordinates_are_pixel_positions():
    head = SpatialSoftmax(in_width=1, keypoints=1)
    with torch.no_grad():
        head.attention.weight.fill_(50.0), head.attention.bias.zero_()
    features = torch.zeros(1, 1, 4, 5)
    features[0, 0, 1, 3] = 1.0  # row 1 of 4, column 3 of 5
    x, y = head(features)[0].tolist()
    assert x == pytest.approx(0.5, abs=1e-3) and y == pytest.approx(-1 / 3, abs=1e-3)  # linspace(-1, 1) positions
    grid = coordinate_channels(torch.zeros(2, 3, 4, 5))
    assert grid.shape == (2, 5, 4, 5)
    assert grid[0, 3, 0].tolist() == pytest.approx([-1, -0.5, 0, 0.5, 1]) and grid[1, 4, :, 0].tolist() == pytest.approx([-1, -1 / 3, 1 / 3, 1])


def test_convnet_refuses_an_unknown_stem_or_head():
    with pytest.raises(LeworldError, match="the stem is one of imagenet, stride2, small"):
        ConvNet(stem="huge")
    with pytest.raises(LeworldError, match="head one of average, keypoints, flatten"):
        ConvNet(head="max")


def test_projector_takes_batch_norm_over_all_leading_dims():
    projector = Projector(6, [16], 4)
    x = torch.randn(3, 10, 6)  # (views, batch, features)
    out = projector(x)
    assert out.shape == (3, 10, 4)
    torch.testing.assert_close(out, projector(x.reshape(30, 6)).reshape(3, 10, 4))
    hidden = projector.net[1](projector.net[0](x.reshape(30, 6)))  # after the first BatchNorm
    torch.testing.assert_close(hidden.mean(0), torch.zeros(16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, parameters, width", [
    ("vit_tiny", 5.50e6, 192), ("vit_small", 21.6e6, 384), ("resnet18", 11.18e6, 512), ("convnet_small", 0.31e6, 128),
])
def test_backbone_presets(name, parameters, width):
    backbone = build_backbone(load_config("pretrain", [f"backbone={name}"]).backbone)
    assert backbone.feature_dim == width
    assert sum(p.numel() for p in backbone.parameters()) == pytest.approx(parameters, rel=0.01)


def test_build_backbone_errors():
    with pytest.raises(LeworldError, match="unknown backbone name 'resnet'"):
        build_backbone({"name": "resnet"})
    with pytest.raises(LeworldError, match="takes no width"):
        build_backbone({"name": "vit", "width": 3})
