"""Image sets: folders with and without classes, array files, generated shapes, and bad input."""

import numpy as np
import pytest
from PIL import Image

from leworld import LeworldError
from leworld.images import SHAPES, load_array, load_folder, make_shapes


def write_png(path, size=(12, 10), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def test_class_folders_give_labels(tmp_path):
    for cls, n in [("cat", 2), ("dog", 3)]:
        for i in range(n):
            write_png(tmp_path / cls / f"{i}.png", value=10 * i)
    images = load_folder(str(tmp_path))
    assert images.images.shape == (5, 10, 12, 3) and images.images.dtype == np.uint8
    assert images.classes == ["cat", "dog"]
    assert images.labels.tolist() == [0, 0, 1, 1, 1]


def test_flat_folder_has_no_labels(tmp_path):
    for i in range(3):
        write_png(tmp_path / f"{i}.jpg")
    images = load_folder(str(tmp_path))
    assert len(images) == 3 and images.labels is None


def test_resize_brings_mixed_sizes_to_one_square(tmp_path):
    write_png(tmp_path / "a.png", (40, 20))
    write_png(tmp_path / "b.png", (16, 30))
    assert load_folder(str(tmp_path), resize=16).images.shape == (2, 16, 16, 3)


def test_folder_errors(tmp_path):
    with pytest.raises(LeworldError, match="does not exist"):
        load_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeworldError, match="no images"):
        load_folder(str(tmp_path / "empty"))
    write_png(tmp_path / "mixed" / "a.png", (8, 8))
    write_png(tmp_path / "mixed" / "b.png", (9, 8))
    with pytest.raises(LeworldError, match="differ in size.*data.resize"):
        load_folder(str(tmp_path / "mixed"))
    write_png(tmp_path / "bad" / "a.png")
    (tmp_path / "bad" / "b.png").write_bytes(b"not a png")
    with pytest.raises(LeworldError, match="cannot read image .*b.png"):
        load_folder(str(tmp_path / "bad"))
    with pytest.raises(LeworldError, match="cannot read image .*b.png"):
        load_folder(str(tmp_path / "bad"), resize=8)


def test_array_files(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", data)
    images = load_array(str(tmp_path / "x.npy"))
    assert isinstance(images.images, np.memmap) and np.array_equal(images.images, data) and images.labels is None
    np.savez(tmp_path / "x.npz", images=data, labels=np.array([0, 1, 2, 0, 1, 2]))
    images = load_array(str(tmp_path / "x.npz"))
    assert images.labels.tolist() == [0, 1, 2, 0, 1, 2] and images.classes == ["0", "1", "2"]


def test_array_errors(tmp_path):
    with pytest.raises(LeworldError, match="does not exist"):
        load_array(str(tmp_path / "none.npy"))
    np.save(tmp_path / "f.npy", np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(LeworldError, match="expected uint8 images"):
        load_array(str(tmp_path / "f.npy"))
    np.savez(tmp_path / "k.npz", pixels=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(LeworldError, match="no array 'images'.*pixels"):
        load_array(str(tmp_path / "k.npz"))
    (tmp_path / "t.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(LeworldError, match="cannot read"):
        load_array(str(tmp_path / "t.npy"))


def test_generated_shapes_are_balanced_and_reproducible():
    a, b = make_shapes(10, 24, seed=3), make_shapes(10, 24, seed=3)
    assert a.images.shape == (80, 24, 24, 3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert np.bincount(a.labels).tolist() == [10] * len(SHAPES)
    assert not np.array_equal(a.images, make_shapes(10, 24, seed=4).images)


def test_split_is_disjoint_and_reproducible():
    shapes = make_shapes(10, 16)
    train, val = shapes.split(0.25, seed=1)
    assert len(train) == 60 and len(val) == 20
    train_again, _ = shapes.split(0.25, seed=1)
    assert np.array_equal(train.images, train_again.images)
    flat = lambda s: {x.tobytes() for x in s.images}
    assert not flat(train) & flat(val)
