"""stable-worldmodel 0.1.1 itself (the test extra), for tests that hold leworld to it: its modules
(leworld/bench/swm.py's loader, which gets past a torchvision that cannot be imported), and a small
LeWM it builds with its own classes and saves with its own save_pretrained."""

import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from leworld.bench.swm import swm_module, transformers_vit


def swm(name: str):
    """The module stable_worldmodel.<name>, or a skip where the test extra is not installed."""
    if importlib.util.find_spec("stable_worldmodel") is None:
        pytest.skip("needs stable-worldmodel (the test extra: pip install 'leworld[test]')")
    return swm_module(name)


def vit_hf(size="tiny", patch_size=16, image_size=224, use_mask_token=True, **kwargs):
    """stable_pretraining.backbone.utils.vit_hf (what LeWM's configs name), built with transformers."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers (the test extra: pip install 'leworld[test]')")
    ViTConfig, ViTModel = transformers_vit()
    hidden, layers, heads = {"tiny": (192, 12, 3), "small": (384, 12, 6)}[size]
    params = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "intermediate_size": 4 * hidden, "image_size": image_size, "patch_size": patch_size, **kwargs}
    return ViTModel(ViTConfig(**params), add_pooling_layer=False, use_mask_token=use_mask_token)


# A small LeWM as stable-worldmodel's config describes it (config.json keeps the _target_s)
ENCODER = {"_target_": "stable_pretraining.backbone.utils.vit_hf", "size": "tiny", "patch_size": 14, "image_size": 28,
           "pretrained": False, "use_mask_token": False, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2, "intermediate_size": 64}
BN = {"_target_": "torch.nn.BatchNorm1d", "_partial_": True}


def lewm_config(action_width: int, history: int = 3) -> dict:
    return {"_target_": "stable_worldmodel.wm.lewm.LeWM", "embed_dim": 32, "history_size": history,
            "encoder": dict(ENCODER),
            "predictor": {"_target_": "stable_worldmodel.wm.lewm.module.Predictor", "num_frames": history, "depth": 2,
                          "heads": 4, "mlp_dim": 64, "input_dim": 32, "hidden_dim": 32, "output_dim": 32, "dim_head": 16,
                          "dropout": 0.1, "emb_dropout": 0.0},
            "action_encoder": {"_target_": "stable_worldmodel.wm.lewm.module.Embedder", "input_dim": action_width,
                               "emb_dim": 32},
            "projector": {"_target_": "stable_worldmodel.wm.lewm.module.MLP", "input_dim": 32, "output_dim": 32,
                          "hidden_dim": 64, "norm_fn": dict(BN)},
            "pred_proj": {"_target_": "stable_worldmodel.wm.lewm.module.MLP", "input_dim": 32, "output_dim": 32,
                          "hidden_dim": 64, "norm_fn": dict(BN)}}


def paper_config(action_width: int = 10) -> dict:
    """LeWM at the paper's sizes (le-wm's config/train/model/lewm.yaml at 224 px): ViT-Tiny/14, a
    predictor of 6 blocks with 16 heads of 64 and an MLP of 2048, projectors of 2048."""
    config = lewm_config(action_width)
    config["encoder"] = {k: v for k, v in ENCODER.items() if k in ("_target_", "size", "pretrained", "use_mask_token")}
    config["encoder"] |= {"patch_size": 14, "image_size": 224}
    config["predictor"] |= {"depth": 6, "heads": 16, "mlp_dim": 2048, "input_dim": 192, "hidden_dim": 192,
                            "output_dim": 192, "dim_head": 64}
    config["action_encoder"]["emb_dim"] = 192
    for head in ("projector", "pred_proj"):
        config[head] |= {"input_dim": 192, "output_dim": 192, "hidden_dim": 2048}
    return config | {"embed_dim": 192}


def build_lewm(config: dict, seed: int = 0):
    """Their LeWM from `config` with their classes, every weight and BatchNorm statistic random (the
    AdaLN-zero gates too, which start at zero: otherwise the predictor's blocks would be identities)."""
    lewm, module = swm("wm.lewm.lewm"), swm("wm.lewm.module")
    torch.manual_seed(seed)

    def args(key):
        return {k: v for k, v in config[key].items() if k not in ("_target_", "norm_fn")}

    encoder = vit_hf(**{k: v for k, v in config["encoder"].items() if k not in ("_target_", "pretrained")})
    model = lewm.LeWM(encoder=encoder, predictor=module.Predictor(**args("predictor")),
                      action_encoder=module.Embedder(**args("action_encoder")),
                      projector=module.MLP(**args("projector"), norm_fn=torch.nn.BatchNorm1d),
                      pred_proj=module.MLP(**args("pred_proj"), norm_fn=torch.nn.BatchNorm1d))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn_like(tensor))
                if name.endswith("running_var"):
                    tensor.abs_()
    return model.eval()


def save_lewm(folder_root: Path, run_name: str, action_width: int, seed: int = 0, config: dict | None = None):
    """Their LeWM (by default the small one above) saved by their own save_pretrained -> (the model,
    its checkpoint folder, <folder_root>/checkpoints/<run_name>)."""
    config = config or lewm_config(action_width)
    model = build_lewm(config, seed)
    swm("wm.utils").save_pretrained(model, run_name, config=OmegaConf.create(config), cache_dir=str(folder_root))
    return model, folder_root / "checkpoints" / run_name
