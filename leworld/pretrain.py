"""Image LeJEPA pretraining: python -m leworld.pretrain [key=value ...]

An encoder (backbone + BatchNorm MLP projector) learns from images alone. Each image is seen
through several random views; every view's embedding is pulled toward the mean embedding of the
image's global views, and SIGReg keeps each view's embeddings an isotropic Gaussian over the
batch, which rules out collapse without a teacher network, stop-gradient or schedule:

    loss = (1 − λ) · mean_v ‖z_v − mean_g z_g‖² + λ · mean_v SIGReg(z_v)

The trained backbone is reused with `load_encoder(run_folder)`.
"""

import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from leworld import LeworldError, settings
from leworld.augment import MultiCrop
from leworld.checkpoint import FILENAME, load_checkpoint, load_weights, save_checkpoint, select
from leworld.images import ImageBatches, ImageSet, load_image_set
from leworld.nn import Projector, build_backbone, check_backbone_name
from leworld.optim import Optimisation, check_finite
from leworld.probe import extract_features, knn_accuracy, linear_probe_accuracy
from leworld.runtime import (Processes, RunLog, autocast, check_values, discard_run, new_run_dir, run_main, seed_everything,
                             start_processes, stop_processes)
from leworld.sigreg import SIGReg


class LeJEPA(nn.Module):
    def __init__(self, backbone: nn.Module, projector: Projector, sigreg: SIGReg, sigreg_weight: float):
        super().__init__()
        self.backbone, self.projector, self.sigreg = backbone, projector, sigreg
        self.sigreg_weight = sigreg_weight

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "LeJEPA":
        backbone = build_backbone(cfg.backbone)
        projector = Projector(backbone.feature_dim, list(cfg.projector.hidden), cfg.projector.out_dim)
        return cls(backbone, projector, SIGReg(**cfg.loss.sigreg), cfg.loss.sigreg_weight)

    def forward(self, global_views: Tensor, local_views: Tensor | None = None) -> dict[str, Tensor]:
        """Views (Vg, B, 3, G, G) and (Vl, B, 3, L, L) of the same B images -> losses, and the
        features of the first global view (B, F) for the online probe."""
        views, batch = len(global_views), global_views.shape[1]
        features = [self.backbone(rearrange(global_views, "v b c h w -> (v b) c h w"))]  # (Vg·B, F)
        if local_views is not None:  # another size: its own backbone pass
            features.append(self.backbone(rearrange(local_views, "v b c h w -> (v b) c h w")))
            views += len(local_views)
        z = rearrange(self.projector(torch.cat(features)), "(v b) d -> v b d", v=views)  # (V, B, D)
        center = z[: len(global_views)].mean(0)  # (B, D): no stop-gradient, no teacher
        pred = (z - center).square().mean()
        sigreg = self.sigreg(z)  # per view over the batch, averaged over views
        loss = (1 - self.sigreg_weight) * pred + self.sigreg_weight * sigreg
        return {"loss": loss, "pred": pred, "sigreg": sigreg, "features": features[0][:batch]}


def load_encoder(path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained backbone of a pretraining run (its folder or checkpoint file), in eval mode:
    images (B, 3, H, W), normalised with leworld.augment.normalize -> features (B, feature_dim)."""
    ckpt = load_checkpoint(path)
    if ckpt.info.get("kind") != "pretrain":
        raise LeworldError(f"{ckpt.path} is a {ckpt.info.get('kind', 'unknown')} checkpoint, not an image pretraining one")
    backbone = build_backbone(ckpt.config["backbone"])
    load_weights(backbone, select(ckpt.tensors, "backbone"), ckpt.path)
    return backbone.to(device).eval()


# ---- training ------------------------------------------------------------------------------


def _loader(images: ImageSet, cfg: DictConfig, procs: Processes) -> DataLoader:
    dataset = ImageBatches(images)
    if procs.world_size > 1:
        order = DistributedSampler(dataset, procs.world_size, procs.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    else:
        order = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed))
    batches = BatchSampler(order, cfg.train.batch_size, drop_last=True)
    if len(batches) == 0:
        raise LeworldError(
            f"{len(images) // procs.world_size} training images per process are fewer than one batch "
            f"(train.batch_size={cfg.train.batch_size}); lower train.batch_size or add images"
        )
    workers = cfg.train.workers
    return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=workers,
                      pin_memory=procs.device.type == "cuda", persistent_workers=workers > 0)


class OnlineProbe:
    """A linear classifier fit on detached features during pretraining: a running read-out of what
    the features say about the labels, which never shapes the encoder."""

    def __init__(self, dim: int, classes: int, lr: float, device: torch.device):
        self.head = nn.Linear(dim, classes).to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr)
        self.correct = self.seen = 0

    def update(self, features: Tensor, labels: Tensor) -> None:
        logits = self.head(F.layer_norm(features.detach().float(), features.shape[-1:]))
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(logits, labels).backward()
        self.optimizer.step()
        self.correct += (logits.argmax(1) == labels).sum()  # a tensor: no sync with the GPU here
        self.seen += len(labels)

    def accuracy(self) -> float:
        """Accuracy since the last call."""
        accuracy = float(self.correct) / max(1, self.seen)
        self.correct = self.seen = 0
        return accuracy


def load_data(cfg: DictConfig) -> tuple[ImageSet, ImageSet]:
    """(train, held-out) image sets: data.val_path if given, else a data.val_fraction split."""
    data = load_image_set(cfg.data)
    if cfg.data.val_path is not None:
        return data, load_image_set(OmegaConf.merge(cfg.data, {"path": cfg.data.val_path}))
    return data.split(cfg.data.val_fraction, cfg.seed)


def evaluate(backbone: nn.Module, initial: nn.Module | None, train: ImageSet, val: ImageSet,
             cfg: DictConfig, device: torch.device) -> dict:
    """Linear probe and k-NN accuracy on held-out images, for the trained backbone and (if given)
    the same backbone at its random initialisation."""
    results = {}
    size = cfg.views["global"].size
    train_y, val_y = torch.from_numpy(train.labels), torch.from_numpy(val.labels)
    for name, net in [("pretrained", backbone), ("random_init", initial)]:
        if net is None:
            continue
        train_x = extract_features(net, train.images, size, device, cfg.probe.batch_size)
        val_x = extract_features(net, val.images, size, device, cfg.probe.batch_size)
        results[name] = {
            "linear_probe": linear_probe_accuracy(train_x, train_y, val_x, val_y, cfg.probe.linear_weight_decay),
            "knn": knn_accuracy(train_x, train_y, val_x, val_y, cfg.probe.knn_k, cfg.probe.knn_temperature),
        }
    return results


def pretrain(cfg: DictConfig) -> dict:
    check_backbone_name(cfg.backbone.name)  # before the weight decay, which is looked up by it
    check_values(cfg, settings.pretrain(cfg))
    for key in ("views.global.scale", "views.local.scale", "augment.blur.sigma"):
        bounds = list(OmegaConf.select(cfg, key))
        if len(bounds) != 2 or bounds[0] > bounds[1]:
            raise LeworldError(f"{key}={bounds}: it must be [lowest, highest]")
    procs = start_processes(cfg.device)
    device = procs.device
    seed_everything(cfg.seed)  # the same initial weights on every process
    train_set, val_set = load_data(cfg)
    labelled = train_set.labels is not None and val_set.labels is not None

    loader = _loader(train_set, cfg, procs)
    opt = Optimisation.start(LeJEPA.from_config(cfg), procs, cfg.train, cfg.train.epochs * len(loader))
    initial_backbone = copy.deepcopy(opt.model.backbone) if cfg.probe.random_baseline and labelled else None
    probe = None
    if cfg.probe.online and labelled:
        probe = OnlineProbe(opt.model.backbone.feature_dim, len(train_set.classes), cfg.probe.online_lr, device)

    # only now, with data and model in hand, is there a run to record
    folder = new_run_dir(cfg.run_dir, "pretrain") if procs.is_main else None
    run_dir = folder.folder if folder else None
    try:
        log = RunLog(run_dir, cfg, enabled=procs.is_main)
        log.print(f"data: {train_set.source}: {len(train_set)} training / {len(val_set)} held-out images of "
                  f"{train_set.images.shape[1]}x{train_set.images.shape[2]} px, {'labelled' if labelled else 'no labels'}")
        if cfg.data.kind == "shapes":
            log.print("      (no image data given, so a generated set is used; pass data=folder data.path=<folder> "
                      "or data=array data.path=<file.npy|.npz> for your own)")
        processes = f" x {procs.world_size} processes" if procs.world_size > 1 else ""
        log.print(f"model: {cfg.backbone.name} backbone + projector, {sum(p.numel() for p in opt.model.parameters()) / 1e6:.2f}M "
                  f"parameters, on {device}{processes}; {cfg.train.epochs * len(loader)} steps; run folder {run_dir}")
        results = pretrain_loop(opt, loader, probe, cfg, procs, run_dir, log)
        opt.net = None  # DDP's reducer holds the process group: let go of it before the group ends
        stop_processes()  # all processes together, before the first alone evaluates
        if not procs.is_main:
            return {}
        if labelled:
            results["eval"] = evaluate(opt.model.backbone, initial_backbone, train_set, val_set, cfg, device)
            log.print(f"frozen features, {len(val_set)} held-out images:  linear probe   k-NN (k={cfg.probe.knn_k})")
            for name, scores in results["eval"].items():
                log.print(f"  {name:<40} {scores['linear_probe']:>12.1%} {scores['knn']:>12.1%}")
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        log.print(f"saved {run_dir / FILENAME}; reuse it with leworld.pretrain.load_encoder('{run_dir}')")
        log.close()
        return results | {"run_dir": str(run_dir)}
    except BaseException:
        if folder is not None:
            discard_run(folder, FILENAME)  # failed before its first checkpoint: the same run_dir can be used again
        raise
    finally:
        if folder is not None:
            folder.release()


def pretrain_loop(opt: Optimisation, loader: DataLoader, probe: OnlineProbe | None, cfg: DictConfig,
                  procs: Processes, run_dir: Path | None, log: RunLog) -> dict:
    """Every epoch of the loader, checkpoints as configured and at the end -> a summary."""
    device, total_steps = procs.device, cfg.train.epochs * len(loader)
    views = MultiCrop(cfg.views, cfg.augment)
    generator = torch.Generator(device).manual_seed(cfg.seed * 1000 + procs.rank)  # each process its own crops
    step, sums, first_sigreg, steps_in_window = 0, {"loss": 0.0, "pred": 0.0, "sigreg": 0.0}, None, 0
    hint = f"lower train.lr (now {cfg.train.lr}) or check the images for NaNs"

    def save() -> None:
        check_finite(float(sums["loss"]), step, hint)  # never replace a good checkpoint with diverged weights
        if procs.is_main:
            save_checkpoint(run_dir / FILENAME, opt.model.state_dict(), OmegaConf.to_container(cfg, resolve=True),
                            kind="pretrain", step=step, epoch=step // len(loader))

    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc="pretrain", disable=not procs.is_main, dynamic_ncols=True)
    try:
        for epoch in range(cfg.train.epochs):
            if procs.world_size > 1:
                loader.sampler.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every process
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with torch.no_grad():
                    global_views, local_views = views(images, generator)
                with autocast(device):
                    out = opt.net(global_views, local_views)
                opt.step(out["loss"])
                if probe is not None:
                    probe.update(out["features"], labels)
                for key in sums:
                    sums[key] += out[key].detach()
                step, steps_in_window = step + 1, steps_in_window + 1
                bar.update()
                if step % cfg.train.log_every == 0 or step == total_steps:
                    check_finite(float(sums["loss"]), step, hint)
                    metrics = {key: float(total) / steps_in_window for key, total in sums.items()}
                    first_sigreg = metrics["sigreg"] if first_sigreg is None else first_sigreg
                    if probe is not None:
                        metrics["probe_acc"] = probe.accuracy()
                    metrics |= {"lr": opt.lr, "epoch": epoch,
                                "images_per_s": step * cfg.train.batch_size * procs.world_size / (time.perf_counter() - start)}
                    log.log(step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", sigreg=f"{metrics['sigreg']:.2f}",
                                    **({"probe": f"{metrics['probe_acc']:.1%}"} if probe else {}),
                                    img_s=f"{metrics['images_per_s']:.0f}")
                    sums, steps_in_window = {key: 0.0 for key in sums}, 0
            if cfg.train.save_every_epochs and (epoch + 1) % cfg.train.save_every_epochs == 0:
                save()
    finally:
        bar.close()  # before any error message, so that it gets a line of its own
    save()
    elapsed = time.perf_counter() - start
    images_per_s = step * cfg.train.batch_size * procs.world_size / elapsed
    log.print(f"trained {step} steps in {elapsed:.0f} s ({images_per_s:.0f} images/s); "
              f"SIGReg {first_sigreg:.2f} -> {metrics['sigreg']:.2f} (an isotropic Gaussian scores about 1.06)")
    return {"steps": step, "seconds": elapsed, "images_per_s": images_per_s, "sigreg_first": first_sigreg,
            "sigreg_last": metrics["sigreg"], "loss_last": metrics["loss"]}


def main() -> None:
    run_main("pretrain", pretrain)


if __name__ == "__main__":
    main()
