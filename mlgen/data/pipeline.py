"""What the text and image pipelines share: split -> host shard -> grain dataset -> batches.

Each modality decides its own split (text: a hash of the document id; images: a fixed
permutation), then, per host::

    rows  = host_rows(global batch, process_index, process_count)
    items = host_shard(split, process_index, process_count)      # split[index::count]
    ds    = map_dataset(items, shuffle_seed=..., repeat=...)      # grain.MapDataset
    ds    = ds.map(...) ...                                       # the modality's own steps
    it    = track(iter(to_iter_dataset(ds, read_options, num_workers)))

The shuffle is grain's: a permutation per epoch from the seed, so batches are a function
of the config and the seed only, and the iterator's ``get_state`` / ``set_state`` resume
exactly.
"""

from __future__ import annotations

import atexit
import math
import weakref
from collections.abc import Sequence
from typing import Any, TypeVar

import grain
from absl import flags

from mlgen.config import check

_T = TypeVar("_T")
_It = TypeVar("_It", bound=grain.DatasetIterator)


def host_rows(batch_size: int, process_index: int, process_count: int) -> int:
    """Rows of this host's batches: the global ``batch_size`` split evenly over the hosts.

    Args:
      batch_size: the GLOBAL batch size.
      process_index: this host, in ``[0, process_count)``.
      process_count: the number of hosts.

    Returns:
      ``batch_size // process_count``.

    Raises:
      ConfigError: ``process_index:`` out of range, or ``batch_size:`` not divisible.
    """
    check(
        0 <= process_index < process_count,
        "process_index",
        f"must be in [0, {process_count}), got {process_index}",
    )
    check(
        batch_size % process_count == 0,
        "batch_size",
        f"global batch {batch_size} is not divisible by the {process_count} hosts",
    )
    return batch_size // process_count


def host_shard(split: Sequence[_T], process_index: int, process_count: int) -> Sequence[_T]:
    """This host's part of a split: every ``process_count``-th item from ``process_index``.

    Hosts get disjoint parts that together cover the split; interleaving (rather than
    contiguous blocks) keeps the parts' sizes within one of each other.
    """
    return split[process_index::process_count]


def map_dataset(
    source: Any, *, shuffle_seed: int | None, repeat: bool, min_len: int = 0
) -> grain.MapDataset:
    """A grain ``MapDataset`` over ``source``: shuffled (if a seed is given), then repeated.

    Args:
      source: anything with ``len`` and ``__getitem__`` (a list, an array source).
      shuffle_seed: seed of the per-epoch shuffle; None keeps the order.
      repeat: repeat forever (training).
      min_len: when not repeating, repeat a whole number of times until there are at least
        this many elements (so that one pass fills a batch).

    Returns:
      The dataset.
    """
    ds = grain.MapDataset.source(source)
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    if repeat:
        ds = ds.repeat(None)
    elif 0 < len(ds) < min_len:
        ds = ds.repeat(math.ceil(min_len / len(ds)))
    return ds


def to_iter_dataset(
    ds: grain.MapDataset, read_options: grain.ReadOptions, num_workers: int
) -> grain.IterDataset:
    """``ds`` as an ``IterDataset``, its elements computed in ``num_workers`` processes if > 0.

    Args:
      ds: the dataset; its map steps run in the workers (they must pickle).
      read_options: threads and prefetch of the reader (in each worker when there are any).
      num_workers: grain worker processes; 0 computes in this process.

    Returns:
      The iterable dataset (``iter()`` it for a resumable iterator).
    """
    stream = ds.to_iter_dataset(read_options)
    if num_workers > 0:
        # grain reads absl flags in mp_prefetch; outside an absl app they are unparsed, which fails.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return stream


def track(it: _It) -> _It:
    """Registers ``it`` to be closed at interpreter exit, and returns it.

    grain's own ``__del__`` otherwise runs while modules are torn down, fails noisily and
    leaks the worker processes' shared memory.
    """
    _LIVE.add(it)
    return it


_LIVE: "weakref.WeakSet[grain.DatasetIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for it in list(_LIVE):
        it.close()
