"""Image sets for image-only pretraining: a folder of images, an array file, or generated shapes.

Every source becomes an `ImageSet`: uint8 images (N, H, W, 3) of one size (a NumPy array, or a
memory map for .npy files, so sets larger than memory train from disk) with optional labels.
"""

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from leworld import LeworldError
from leworld.dataset import EpisodeDataset
from leworld.runtime import require

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray | None  # (N,) int64
    classes: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> "ImageSet":
        labels = None if self.labels is None else self.labels[index]
        return ImageSet(self.images[index], labels, self.classes, self.source)

    def split(self, val_fraction: float, seed: int) -> tuple["ImageSet", "ImageSet"]:
        """A random held-out split (train, val); the same seed gives the same split."""
        order = np.random.default_rng(seed).permutation(len(self))
        n_val = int(round(val_fraction * len(self)))
        if n_val == 0 or n_val == len(self):
            raise LeworldError(f"data.val_fraction={val_fraction} leaves an empty split of {len(self)} images")
        return self.subset(np.sort(order[n_val:])), self.subset(np.sort(order[:n_val]))


class ImageBatches(torch.utils.data.Dataset):
    """Indexable by a list of indices, giving a whole batch at once: uint8 (B, 3, H, W) and labels
    (B,) (-1 where the set has no labels). Used with a BatchSampler as the sampler."""

    def __init__(self, images: ImageSet):
        self.set = images

    def __len__(self) -> int:
        return len(self.set)

    def __getitem__(self, index: list[int]):
        index = np.sort(np.asarray(index))  # sorted reads are sequential on a memory map
        images = torch.from_numpy(np.ascontiguousarray(self.set.images[index])).permute(0, 3, 1, 2)
        labels = torch.full((len(index),), -1) if self.set.labels is None else torch.from_numpy(self.set.labels[index])
        return images, labels


# ---- sources -------------------------------------------------------------------------------


def _read_image(path: Path, resize: int | None) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if resize is not None:  # shorter side to `resize`, then the central square
                scale = resize / min(img.size)
                w, h = max(resize, round(img.width * scale)), max(resize, round(img.height * scale))
                img = img.resize((w, h), Image.BICUBIC)
                left, top = (w - resize) // 2, (h - resize) // 2
                img = img.crop((left, top, left + resize, top + resize))
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise LeworldError(f"cannot read image {path}: {err}; remove or replace the file") from None


def load_folder(path: str, resize: int | None = None, workers: int = 8) -> ImageSet:
    """Images under `path`; with class sub-folders (path/<class>/*.png) their names are the labels.

    Images are decoded once into memory. Without `resize` they must all have the same size.
    """
    root = Path(path)
    if not root.is_dir():
        raise LeworldError(f"image folder {root} does not exist; pass data.path=<folder of images>")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = lambda d: sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if class_dirs:
        per_class = [(d.name, files(d)) for d in class_dirs]
        per_class = [(name, fs) for name, fs in per_class if fs]
        paths = [f for _, fs in per_class for f in fs]
        labels = np.concatenate([np.full(len(fs), i, dtype=np.int64) for i, (_, fs) in enumerate(per_class)]) if paths else None
        classes = [name for name, _ in per_class]
    else:
        paths, labels, classes = files(root), None, None
    if not paths:
        raise LeworldError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    if resize is None:
        sizes = {}
        for p in paths:
            try:
                with Image.open(p) as img:
                    sizes.setdefault(img.size, p)
            except (UnidentifiedImageError, OSError) as err:
                raise LeworldError(f"cannot read image {p}: {err}; remove or replace the file") from None
            if len(sizes) > 1:
                (size_a, a), (size_b, b) = sizes.items()
                raise LeworldError(
                    f"images differ in size ({a.name} is {size_a[0]}x{size_a[1]}, {b.name} is {size_b[0]}x{size_b[1]}); "
                    "pass data.resize=<pixels> to bring them to one size"
                )
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes outside the GIL
        decoded = list(tqdm(pool.map(lambda p: _read_image(p, resize), paths), total=len(paths),
                            desc=f"reading {root.name}", leave=False))
    return ImageSet(np.stack(decoded), labels, classes, f"folder {root}")


def load_array(path: str, images_key: str = "images", labels_key: str = "labels",
               labels_path: str | None = None) -> ImageSet:
    """uint8 images (N, H, W, 3) from a .npy file (memory-mapped) or a .npz archive, with labels
    from the archive's `labels_key` or from a separate .npy file."""
    file = Path(path)
    if not file.is_file():
        raise LeworldError(f"image array {file} does not exist; pass data.path=<file.npy or file.npz>")
    labels = None
    try:
        if file.suffix == ".npy":
            images = np.load(file, mmap_mode="r")
        elif file.suffix == ".npz":
            archive = np.load(file)
            if images_key not in archive:
                raise LeworldError(f"{file} has no array {images_key!r} (it has {', '.join(archive.files)}); set data.images_key")
            images = archive[images_key]
            labels = archive[labels_key] if labels_key in archive else None
        else:
            raise LeworldError(f"{file} is neither .npy nor .npz")
        if labels_path is not None:
            labels = np.load(labels_path)
    except (ValueError, OSError, EOFError) as err:
        raise LeworldError(f"cannot read {file}: {err}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise LeworldError(f"{file} holds {images.dtype} {tuple(images.shape)}; expected uint8 images (N, H, W, 3)")
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != (len(images),):
            raise LeworldError(f"labels have shape {labels.shape}; expected ({len(images)},), one per image")
    classes = None if labels is None else [str(c) for c in range(int(labels.max()) + 1)]
    return ImageSet(images, labels, classes, f"array {file}")


# ---- generated shapes ----------------------------------------------------------------------

SHAPES = ["disc", "ring", "square", "frame", "triangle", "plus", "bar", "star"]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a unit-sized shape in its own frame (u, v in about [-1, 1])."""
    r = np.hypot(u, v)
    if shape == "disc":
        return r < 1
    if shape == "ring":
        return (r < 1) & (r > 0.6)
    if shape == "square":
        return np.maximum(abs(u), abs(v)) < 0.85
    if shape == "frame":
        m = np.maximum(abs(u), abs(v))
        return (m < 0.9) & (m > 0.55)
    if shape == "triangle":  # equilateral, pointing up, centred on its centroid
        return (v > -0.5) & (v < 1 - np.sqrt(3) * abs(u) * 1.0)
    if shape == "plus":
        return ((abs(u) < 0.3) & (abs(v) < 1)) | ((abs(v) < 0.3) & (abs(u) < 1))
    if shape == "bar":
        return (abs(u) < 1) & (abs(v) < 0.28)
    if shape == "star":  # five points: radius varies with the angle
        angle = np.arctan2(v, u)
        return r < 0.45 + 0.55 * np.abs(np.cos(2.5 * angle)) ** 3
    raise ValueError(shape)


def make_shapes(per_class: int = 500, size: int = 32, seed: int = 0) -> ImageSet:
    """A labelled set of 8 shape classes: each image scatters 4 to 7 copies of its class's shape on
    a gray background, every copy with its own position, size, rotation and shade (black or white).

    All that every crop of an image shares is the type of shape, so an encoder can only agree
    across views by recognising it; global colour, position or size would be shortcuts that let
    a self-supervised encoder agree across views without learning shape, and this set has none.
    """
    rng = np.random.default_rng(seed)
    coords = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    y, x = np.meshgrid(coords, coords, indexing="ij")
    images = np.empty((len(SHAPES) * per_class, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(len(SHAPES)), per_class)
    for i, label in enumerate(labels):
        image = np.broadcast_to(0.5 + rng.uniform(-0.05, 0.05, 3), (size, size, 3))
        for _ in range(rng.integers(4, 8)):
            radius = rng.uniform(0.2, 0.35)
            cx, cy = rng.uniform(-1, 1, size=2)  # copies may run off the edge
            angle = rng.uniform(0, 2 * math.pi)
            cos, sin = math.cos(angle), math.sin(angle)
            u = ((x - cx) * cos + (y - cy) * sin) / radius
            v = (-(x - cx) * sin + (y - cy) * cos) / radius
            image = np.where(_shape_mask(SHAPES[label], u, v)[..., None], rng.choice([0.1, 0.9]), image)
        image = image + rng.normal(0, 0.04, size=(size, size, 3))
        images[i] = np.clip(image * 255, 0, 255).astype(np.uint8)
    order = rng.permutation(len(images))
    return ImageSet(images[order], labels[order], list(SHAPES), f"generated shapes ({len(SHAPES)} classes, {size} px)")


def load_dataset_frames(path: str) -> ImageSet:
    """The frames of a leworld dataset (python -m leworld.collect), memory-mapped, without labels."""
    dataset = EpisodeDataset.open(path)
    return ImageSet(dataset.tensors["pixels"].numpy(), None, None,
                    f"frames of {dataset.meta['env']['name']} dataset {path}")


def load_image_set(cfg) -> ImageSet:
    """The image set a `data` config (configs/data/*.yaml) describes."""
    if cfg.kind == "shapes":
        return make_shapes(cfg.per_class, cfg.size, cfg.seed)
    if cfg.kind == "folder":
        return load_folder(require(cfg, "path", "data.path is required: data=folder data.path=<folder of images>"),
                           cfg.resize)
    if cfg.kind == "array":
        return load_array(require(cfg, "path", "data.path is required: data=array data.path=<file.npy or file.npz>"),
                          cfg.images_key, cfg.labels_key, cfg.labels_path)
    if cfg.kind == "dataset":
        return load_dataset_frames(require(cfg, "path", "data.path is required: data=dataset data.path=<dataset folder>"))
    raise LeworldError(f"data.kind={cfg.kind!r} is unknown; use data=shapes, folder, array or dataset")
