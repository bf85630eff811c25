"""Which views a rank reads, in which order: the stage-2 loader's sampling, as pure functions.

Data flow: the manifest's shard sizes --> ``view_epoch_for`` (training epoch -> view-epoch) -->
``epoch_order`` (the epoch's global sample order) --> ``rank_batches`` (this rank's batches from a
resume position) --> ``first_reads`` (which batch checks which shard first) --> cache_loader.py,
which reads them. Everything here is a function of its arguments (seed, epoch, sizes, rank, world
size, batch size, step), so (epoch, step) is all a checkpoint has to record to resume.

Order: the view-epoch's shards are permuted, concatenated, and the samples inside each run of
``shuffle_window`` consecutive shards are shuffled, so every batch stays within a few shards while
each epoch sees a different order. Partition: the global order is cut to a multiple of
``world_size * batch_size`` (drop_last, as the reference's DistributedSampler with drop_last) and
global batch b goes to rank ``b % world_size``; every rank runs the same number of steps.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["VIEW_ORDERS", "epoch_order", "first_reads", "rank_batches", "steps_per_epoch", "view_epoch_for"]

VIEW_ORDERS = ("cycle", "permute")
# Independent random streams derived from the user's seed: one per purpose, so changing how one
# is used never shifts the other.
_ORDER_STREAM = 0
_VIEW_STREAM = 1


def view_epoch_for(epoch: int, *, num_view_epochs: int, view_order: str, seed: int) -> int:
    """Which view-epoch training epoch ``epoch`` reads: ``epoch % K`` ("cycle"), or position
    ``epoch % K`` of a seeded permutation of range(K) drawn anew for every K epochs ("permute")."""
    k = num_view_epochs
    if view_order == "cycle":
        return epoch % k
    rng = np.random.default_rng(np.random.SeedSequence([seed, _VIEW_STREAM, epoch // k]))
    return int(rng.permutation(k)[epoch % k])


def epoch_order(sizes: Sequence[int], *, seed: int, epoch: int, shuffle_window: int) -> np.ndarray:
    """Global sample order of one epoch over shards of ``sizes`` samples (manifest order).

    A sample is numbered by its shard's offset in the concatenation plus its record index. The
    shards are permuted, then the samples of each run of ``shuffle_window`` consecutive (permuted)
    shards are shuffled among themselves. Pure function of its arguments.
    """
    counts = np.asarray(sizes, dtype=np.int64)  # [S]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    rng = np.random.default_rng(np.random.SeedSequence([seed, _ORDER_STREAM, epoch]))
    perm = rng.permutation(len(counts))
    order = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in perm]) if len(counts) else np.empty(0, np.int64)
    bounds = np.concatenate([[0], np.cumsum(counts[perm])])[::shuffle_window]
    for lo, hi in zip(bounds, [*bounds[1:], len(order)]):
        rng.shuffle(order[lo:hi])
    return order


def steps_per_epoch(view_epoch_sizes: Sequence[int], *, world_size: int, batch_size: int) -> int:
    """Steps every rank runs in every epoch: the smallest view-epoch over ``world_size * batch_size``."""
    return min(view_epoch_sizes) // (world_size * batch_size)


def rank_batches(order: np.ndarray, *, rank: int, world_size: int, batch_size: int, steps: int,
                 start_step: int = 0) -> list[np.ndarray]:
    """This rank's batches of an epoch's ``order`` (``steps`` per epoch), from step ``start_step``:
    global batch ``step * world_size + rank`` of ``batch_size`` samples (the tail is dropped)."""
    firsts = [(step * world_size + rank) * batch_size for step in range(start_step, steps)]
    return [order[lo : lo + batch_size] for lo in firsts]


def first_reads(batch_shards: Sequence[set[int]], done: set[int]) -> list[frozenset[int]]:
    """Per batch, the shards it reads before any earlier batch of the list did, leaving out ``done``
    (shards already checked): the batch that checks each shard before its records are used."""
    seen = set(done)
    out = []
    for shards in batch_shards:
        new = shards - seen
        seen |= new
        out.append(frozenset(new))
    return out
