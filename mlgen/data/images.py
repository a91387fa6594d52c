"""Image data (grain): scikit-learn's bundled digits by default, or a folder of PNGs.

Batches are dicts of numpy arrays: ``images`` float32 ``[b, H, W, C]`` in [-1, 1] and
``labels`` int32 ``[b]`` (with ``low_res_size > 0`` also ``low_res`` ``[b, h, h, C]``: the
images downsampled by area averaging in the pipeline, a super-resolution model's input), where
``b = batch_size // process_count`` (each host reads its own
slice of the data). Train iterators are infinite, shuffled per epoch from the run's seed,
and resumable (``get_state`` / ``set_state``).

Sources:
- ``digits``: ``sklearn.datasets.load_digits`` (1,797 8x8 images, 10 classes, no download),
  resized bilinearly to ``image_size`` and scaled from [0, 16] to [-1, 1];
- ``folder``: every ``*.png`` under ``path`` (recursively; local or ``gs://...``); images in
  sub-folders get the label of their sub-folder (sorted names -> 0, 1, ...), images directly
  in ``path`` label 0. Files are read and resized in the pipeline (in worker processes when
  ``num_workers > 0``).

The split into train / validation is a fixed permutation (seed 0) of the whole source, so
the held-out images do not depend on the run's seed; host shards, shuffling and batching
are the text pipeline's too (:mod:`mlgen.data.pipeline`).
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import Literal

import grain
import numpy as np
from etils import epath
from PIL import Image

from mlgen.config import ConfigError, check, register
from mlgen.data.paths import is_remote, write_bytes_atomic
from mlgen.data.pipeline import host_rows, host_shard, map_dataset, to_iter_dataset, track

__all__ = [
    "ImageDataConfig",
    "array_data",
    "check_images",
    "class_names",
    "downsample_area",
    "load_arrays",
    "make_image_data",
    "num_classes",
    "save_grid",
]


@register("images", aliases=("mlgen.data.images:ImageDataConfig",))
@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageDataConfig:
    """Image data.

    Attributes:
      source: ``digits`` | ``folder``.
      path: the folder of PNGs (``folder`` source), local or remote (``gs://...``).
      image_size: side of the square images fed to the model.
      channels: 1 (grayscale) or 3 (RGB); digits are 1.
      batch_size: GLOBAL batch size (split over hosts and the mesh's data axes).
      num_workers: grain worker processes (0 = in the main process).
      val_fraction: share of the source held out for validation / evaluation.
      hflip: random horizontal flips (not for digits).
      vae: latent diffusion: the workdir of a trained VAE run whose latents of these images the
        diffusion task trains on (``mlgen.tasks.latent``); "" = the images themselves.
      low_res_size: super-resolution: batches also hold ``low_res``, the images downsampled to
        this side by area averaging (it divides ``image_size``); 0 = none.
    """

    source: Literal["digits", "folder"] = "digits"
    path: str = ""
    image_size: int = 16
    channels: int = 1
    batch_size: int = 64
    num_workers: int = 0
    val_fraction: float = 0.1
    hflip: bool = False
    vae: str = ""
    low_res_size: int = 0

    def validate(self) -> None:
        check(
            self.source in ("digits", "folder"),
            "source",
            f"must be 'digits' or 'folder', got {self.source!r}",
        )
        if self.source == "folder":
            check(self.path != "", "path", "the folder source needs path=<folder of PNGs>")
            check(_folder(self.path).is_dir(), "path", f"no such folder {self.path!r}")
        else:
            check(
                self.channels == 1,
                "channels",
                f"digits are grayscale (channels=1), got {self.channels}",
            )
        check(self.image_size >= 4, "image_size", f"must be >= 4, got {self.image_size}")
        check(self.channels in (1, 3), "channels", f"must be 1 or 3, got {self.channels}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        check(
            0.0 < self.val_fraction < 1.0,
            "val_fraction",
            f"must be in (0, 1), got {self.val_fraction}",
        )
        check(
            self.low_res_size == 0
            or (
                0 < self.low_res_size <= self.image_size
                and self.image_size % self.low_res_size == 0
            ),
            "low_res_size",
            f"{self.low_res_size} must divide image_size={self.image_size} (0 = no low-res images)",
        )
        if self.vae:
            check(
                epath.Path(self.vae).is_dir(),
                "vae",
                f"no such directory {self.vae!r} (a trained VAE run's workdir)",
            )


# ----------------------------------------------------------------------------- sources
def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """float32 [h, w, c] -> [size, size, c], bilinear."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    chans = [
        np.asarray(Image.fromarray(img[..., c], mode="F").resize((size, size), Image.BILINEAR))
        for c in range(img.shape[-1])
    ]
    return np.stack(chans, axis=-1)


def _digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    # Imported here: scikit-learn takes a second or two to import, which folder runs and
    # every grain worker (they import this module) would pay for nothing.
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = d.images.astype(np.float32)[..., None] / 16.0 * 2.0 - 1.0
    imgs = np.stack([_resize(im, image_size) for im in imgs]).clip(-1.0, 1.0)
    return imgs.astype(np.float32), d.target.astype(np.int32)


def _folder(path: str) -> Path | epath.Path:
    # Local folders keep pathlib's glob semantics exactly (which files, in which order: the
    # split depends on it); epath has no recursive glob, see _pngs.
    return epath.Path(path) if is_remote(path) else Path(path)


def _pngs(folder: Path | epath.Path, recursive: bool) -> list[Path | epath.Path]:
    """The ``*.png`` files in ``folder`` (and below it if ``recursive``), sorted as paths."""
    if isinstance(folder, Path):
        return sorted(folder.rglob("*.png") if recursive else folder.glob("*.png"))
    out = []
    for p in folder.iterdir():  # one listing per directory of the object store
        if p.name.endswith(".png"):
            out.append(p)
        elif recursive and p.is_dir():
            out += _pngs(p, True)
    return sorted(out)


def class_names(path: str) -> list[str]:
    """Sorted sub-folder names of a PNG folder (the class names; [] if unlabelled)."""
    return sorted(p.name for p in _folder(path).iterdir() if p.is_dir() and _pngs(p, True))


def _folder_items(path: str) -> list[tuple[str, int]]:
    root = _folder(path)
    names = class_names(path)
    items = [(str(p), 0) for p in _pngs(root, False)]
    for label, name in enumerate(names):
        items += [(str(p), label) for p in _pngs(root / name, True)]
    if not items:
        raise ConfigError(f"path: no *.png files under {path!r}")
    return items


def check_images(cfg: ImageDataConfig) -> None:
    """Reads the folder source's listing before training: PNGs for both splits (ConfigError
    ``path:``). The digits are bundled: nothing to check."""
    if cfg.source == "folder":
        n = len(_folder_items(cfg.path))
        check(n >= 2, "path", f"{n} *.png file under {cfg.path!r}; need 2 (one per split)")


def _split(n: int, val_fraction: float, split: str) -> np.ndarray:
    perm = np.random.default_rng(0).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[:n_val] if split == "validation" else perm[n_val:])


class _ArraySource:
    """Random access to in-memory images and labels (picklable, for grain workers)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"images": self.images[i], "labels": self.labels[i]}


class _LoadPNG:
    def __init__(self, image_size: int, channels: int):
        self.image_size, self.channels = image_size, channels

    def __call__(self, item):
        path, label = item
        with epath.Path(path).open("rb") as f, Image.open(f) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
            x = np.asarray(im, np.float32).reshape(self.image_size, self.image_size, self.channels)
        return {"images": x / 127.5 - 1.0, "labels": np.int32(label)}


def downsample_area(images: np.ndarray, size: int) -> np.ndarray:
    """``[..., H, W, C] -> [..., size, size, C]``: the mean of each ``H/size x W/size`` block
    (``size`` divides ``H`` and ``W``). numpy, for the data pipeline."""
    *lead, h, w, c = images.shape
    if h % size or w % size:
        raise ValueError(f"downsample_area: {size} does not divide the image size {h}x{w}")
    fh, fw = h // size, w // size
    x = np.asarray(images, np.float32).reshape(*lead, size, fh, size, fw, c)
    return x.mean(axis=(-4, -2))


class _AddLowRes:
    """Adds ``low_res``: the image averaged over ``f x f`` blocks (after any flip)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, element):
        return dict(element, low_res=downsample_area(element["images"], self.size))


class _RandomFlip(grain.transforms.RandomMap):
    def random_map(self, element, rng: np.random.Generator):
        if rng.random() < 0.5:
            element = dict(element, images=element["images"][:, ::-1].copy())
        return element


def load_arrays(cfg: ImageDataConfig, split: Literal["train", "validation", "all"] = "all"):
    """The whole split as arrays ``(images [n, H, W, C], labels [n])`` (evaluation, small sets)."""
    if cfg.source == "digits":
        images, labels = _digits(cfg.image_size)
    else:
        load = _LoadPNG(cfg.image_size, cfg.channels)
        rows = [load(it) for it in _folder_items(cfg.path)]
        images = np.stack([r["images"] for r in rows])
        labels = np.array([r["labels"] for r in rows], np.int32)
    if split == "all":
        return images, labels
    idx = _split(len(labels), cfg.val_fraction, split)
    return images[idx], labels[idx]


def batch_spec(cfg: ImageDataConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The GLOBAL batch's ``key -> (shape, dtype)``, without reading any data (``mlgen plan``)."""
    b, s, lr = cfg.batch_size, cfg.image_size, cfg.low_res_size
    spec = {
        "images": ((b, s, s, cfg.channels), np.dtype(np.float32)),
        "labels": ((b,), np.dtype(np.int32)),
    }
    if lr:
        spec["low_res"] = ((b, lr, lr, cfg.channels), np.dtype(np.float32))
    return spec


def num_classes(cfg: ImageDataConfig) -> int:
    """10 for digits; the number of sub-folders (or 1) for a folder."""
    return 10 if cfg.source == "digits" else max(1, len(class_names(cfg.path)))


def make_image_data(
    cfg: ImageDataConfig,
    *,
    split: Literal["train", "validation"],
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool | None = None,
    example_map: grain.transforms.RandomMap | None = None,
):
    """This host's batches of one split.

    ``example_map``: a grain random map applied to each example before batching, seeded by
    ``seed`` (captions for text-to-image: ``mlgen.data.captions.CaptionMap``).

    Returns:
      A grain ``DatasetIterator`` (``get_state`` / ``set_state``) of ``{"images", "labels"}``
      batches of ``cfg.batch_size // process_count`` rows. Train: shuffled, infinite.
      Validation: one pass in a fixed order (repeated to fill at least one batch).
    """
    cfg.validate()
    rows = host_rows(cfg.batch_size, process_index, process_count)
    repeat = (split == "train") if repeat is None else repeat
    if cfg.source == "digits":
        images, labels = _digits(cfg.image_size)
        idx = host_shard(_split(len(labels), cfg.val_fraction, split), process_index, process_count)
        source = _ArraySource(images[idx], labels[idx])
    else:
        items = _folder_items(cfg.path)
        idx = host_shard(_split(len(items), cfg.val_fraction, split), process_index, process_count)
        source = [items[i] for i in idx]
    if len(source) == 0:
        raise ConfigError(f"data.val_fraction: the {split} split is empty on host {process_index}")
    ds = map_dataset(
        source, shuffle_seed=seed if split == "train" else None, repeat=repeat, min_len=rows
    )
    if cfg.source == "folder":
        ds = ds.map(_LoadPNG(cfg.image_size, cfg.channels))
    if cfg.hflip and split == "train":
        ds = ds.random_map(_RandomFlip(), seed=seed)
    if example_map is not None:
        ds = ds.random_map(example_map, seed=seed)
    if cfg.low_res_size:
        ds = ds.map(_AddLowRes(cfg.low_res_size))
    ds = ds.batch(rows, drop_remainder=True)
    read = grain.ReadOptions(num_threads=0 if cfg.num_workers else 1, prefetch_buffer_size=2)
    return track(iter(to_iter_dataset(ds, read, cfg.num_workers)))


def array_data(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    split: Literal["train", "validation"],
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """Batches of in-memory arrays (one split, e.g. a VAE's latents of it) through the same
    pipeline as :func:`make_image_data`: this host's rows, shuffled per epoch and infinite for
    ``train``, one pass in order for ``validation``; resumable."""
    rows = host_rows(batch_size, process_index, process_count)
    idx = host_shard(np.arange(len(labels)), process_index, process_count)
    if len(idx) == 0:
        raise ConfigError(f"data.val_fraction: the {split} split is empty on host {process_index}")
    ds = map_dataset(
        _ArraySource(images[idx], labels[idx]),
        shuffle_seed=seed if split == "train" else None,
        repeat=split == "train",
        min_len=rows,
    ).batch(rows, drop_remainder=True)
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    return track(iter(to_iter_dataset(ds, read, 0)))


# ----------------------------------------------------------------------------- grids
def save_grid(
    images: np.ndarray, path, *, ncol: int | None = None, scale: int = 2, pad: int = 1
) -> epath.Path:
    """Writes ``images`` ``[N, H, W, C]`` in [-1, 1] as a PNG grid (``ncol`` per row); any
    ``etils.epath`` path (local or ``gs://``)."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + q * (w + pad) : pad + q * (w + pad) + w,
        ] = images[i]
    pixels = np.round((grid.clip(-1, 1) + 1.0) * 127.5).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    img = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
    return path
