"""Which examples go into which optimizer step, which rank and which micro-batch.

The global batch of one optimizer step (micro-batch x grad-accum x world size examples) is a
function of the seed and the epoch only, so every split of it into ranks and micro-batches sees
the same examples in the same step. Every rank computes the whole plan itself: no communication,
and each rank knows the target-token count of the whole step (the SFT loss divides by it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

# Global batches per length-sorted window: wide enough that neighbours have nearly equal lengths,
# narrow enough that every part of the data set still mixes into every part of the epoch.
LENGTH_WINDOW = 32


def step_batches(num_examples: int, global_batch: int, seed: int, epoch: int,
                 lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Shuffle `range(num_examples)` with (seed, epoch) and cut it into full global batches.

    The incomplete tail is dropped (it would give some ranks empty micro-batches).
    Example: step_batches(5, 2, seed, 0) -> e.g. [[3, 0], [4, 1]] (one example left out).

    With `lengths`, batches are length-grouped so padding is not computed: the shuffled order is cut
    into windows of LENGTH_WINDOW global batches, each window sorted by length and cut into batches,
    and the batches of the epoch are shuffled again (so short and long steps alternate). Each step
    is still a function of (seed, epoch) only.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(num_examples))
    rng.shuffle(order)
    usable = num_examples - num_examples % global_batch
    if lengths is None:
        return [order[i:i + global_batch] for i in range(0, usable, global_batch)]
    window = LENGTH_WINDOW * global_batch
    grouped = [i for start in range(0, num_examples, window)
               for i in sorted(order[start:start + window], key=lambda i: lengths[i])]
    batches = [grouped[i:i + global_batch] for i in range(0, num_examples - global_batch + 1, global_batch)]
    rng.shuffle(batches)
    return batches[:usable // global_batch]


def micro_batches_of_rank(step: Sequence[int], lengths: Sequence[int], rank: int, world_size: int,
                          micro_batch: int) -> list[list[int]]:
    """This rank's micro-batches of one optimizer step, grouped by length to cut padding.

    The step's examples are sorted by length (stable), cut into micro-batches, and dealt to the
    ranks in turn: chunk j goes to rank j % world_size. With lengths [5, 1, 9, 3], 2 ranks and
    micro-batch 1: sorted [1, 3, 0, 2] -> rank 0 gets [[1], [0]], rank 1 gets [[3], [2]].
    """
    ordered = sorted(step, key=lambda i: lengths[i])
    chunks = [ordered[i:i + micro_batch] for i in range(0, len(ordered), micro_batch)]
    return chunks[rank::world_size]


def eval_micro_batches_of_rank(num_examples: int, rank: int, world_size: int,
                               micro_batch: int) -> list[list[int]]:
    """Every example exactly once over all ranks; every rank gets the same number of micro-batches.

    Under ZeRO-3 each forward is collective, so a rank with fewer batches would hang the others:
    a rank that runs out gets empty lists, which the caller turns into a zero-weight forward.
    """
    mine = list(range(rank, num_examples, world_size))
    per_rank = -(-num_examples // world_size)
    count = -(-per_rank // micro_batch)
    return [mine[i * micro_batch:(i + 1) * micro_batch] for i in range(count)]
