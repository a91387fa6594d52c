"""Image data: digits, PNG folders, resumable iterators, sample grids."""

import numpy as np
import pytest
from PIL import Image

from mlgen.config import ConfigError
from mlgen.data.images import ImageDataConfig, load_arrays, make_image_data, save_grid


def test_digits_batches_and_resume():
    cfg = ImageDataConfig(batch_size=16)
    it = make_image_data(cfg, split="train", seed=3)
    b = next(it)
    assert b["images"].shape == (16, 16, 16, 1) and b["images"].dtype == np.float32
    assert b["labels"].shape == (16,) and b["labels"].dtype == np.int32
    assert -1.0 <= b["images"].min() < -0.9 and 0.9 < b["images"].max() <= 1.0
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it2 = make_image_data(cfg, split="train", seed=3)
    it2.set_state(state)
    for w in want:
        got = next(it2)
        np.testing.assert_array_equal(got["images"], w["images"])
        np.testing.assert_array_equal(got["labels"], w["labels"])


def test_digits_splits_are_disjoint_and_hosts_split_batches():
    cfg = ImageDataConfig(batch_size=8)
    tr, _ = load_arrays(cfg, "train")
    va, _ = load_arrays(cfg, "validation")
    assert len(tr) + len(va) == 1797 and len(va) == 180
    flat = {x.tobytes() for x in tr}
    assert (
        sum(x.tobytes() in flat for x in va) <= 2
    )  # a few digits are exact duplicates in the source
    h0 = next(make_image_data(cfg, split="validation", seed=0, process_index=0, process_count=2))
    h1 = next(make_image_data(cfg, split="validation", seed=0, process_index=1, process_count=2))
    assert h0["images"].shape[0] == 4 and not np.array_equal(h0["images"], h1["images"])


def test_png_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    cfg = ImageDataConfig(
        source="folder",
        path=str(tmp_path),
        image_size=8,
        channels=3,
        batch_size=4,
        val_fraction=0.2,
        hflip=True,
    )
    b = next(make_image_data(cfg, split="train", seed=0))
    assert b["images"].shape == (4, 8, 8, 3) and set(b["labels"].tolist()) <= {0, 1}
    assert b["images"].min() >= -1.0 and b["images"].max() <= 1.0
    v = next(make_image_data(cfg, split="validation", seed=0))  # 2 images repeated to fill a batch
    assert v["images"].shape == (4, 8, 8, 3)
    with pytest.raises(ConfigError, match="^path:"):
        ImageDataConfig(source="folder", path=str(tmp_path / "nope")).validate()


def test_save_grid(tmp_path):
    x = np.linspace(-1, 1, 6 * 4 * 4).reshape(6, 4, 4, 1)
    p = save_grid(x, tmp_path / "g.png", ncol=3, scale=1)
    assert Image.open(p).size == (3 * 5 + 1, 2 * 5 + 1)
