"""Which examples go into which optimizer step, which rank and which micro-batch; and how a
micro-batch becomes tensors: packed into one row (the default), or padded rows.

The global batch of one optimizer step (micro-batch x grad-accum x world size examples) is a
function of the seed and the epoch only, so every split of it into ranks and micro-batches sees
the same examples in the same step. Every rank computes the whole plan itself: no communication,
and each rank knows the target-token count of the whole step (the SFT loss divides by it).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence

import torch

from dialogtrain.formatting import IGNORE_INDEX

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


def collate_sft(examples: Sequence[dict], pad_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Padding is marked by the attention mask and -100 labels.

    [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad 0 ->
      input_ids      [[5, 6, 7], [8, 0, 0]]
      attention_mask [[1, 1, 1], [1, 0, 0]]
      labels         [[-100, 6, 7], [8, -100, -100]]

    packed: collate_packed instead (one row, no padding).
    """
    if packed:
        return collate_packed(examples)
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """All examples in one row, one after the other: no padding is computed.

    Each example keeps its own positions (0, 1, ...), from which transformers builds a
    block-diagonal causal mask when no attention mask is given, so no token attends to another
    example (attention.packs_sequences checks that a model does). `sequence_ids` says which example each
    position belongs to. An example's first label becomes -100: the position before it belongs to
    the previous example (a padded row never learns its first token either).
    [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}] ->
      input_ids    [[5, 6, 7, 8, 9]]
      position_ids [[0, 1, 2, 0, 1]]
      labels       [[-100, 6, 7, -100, 9]]
      sequence_ids [[0, 0, 0, 1, 1]]
    """
    ids, labels, positions, owners = [], [], [], []
    for k, e in enumerate(examples):
        n = len(e["input_ids"])
        ids += e["input_ids"]
        labels += [IGNORE_INDEX, *e["labels"][1:]]
        positions += range(n)
        owners += [k] * n
    return {name: torch.tensor([values], dtype=torch.long) for name, values in
            (("input_ids", ids), ("position_ids", positions), ("labels", labels), ("sequence_ids", owners))}


def input_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of the examples in a collated batch, padding not counted."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


Collate = Callable[[list[dict]], dict[str, torch.Tensor]]  # a micro-batch's examples -> its tensors


def choose_collate(collate: Callable, packing: bool, model: torch.nn.Module, pad_id: int,
                   say: Callable[[str], None]) -> Collate:
    """`collate` (collate_sft or collate_preferences) packed when `packing` (--packing, the default) and
    the model keeps packed examples apart (attention.prepare_for_packing), padded otherwise (and `say` why)."""
    from dialogtrain.attention import prepare_for_packing

    packed = packing and prepare_for_packing(model)
    if packing and not packed:
        say("packing: off, this model lets examples packed into one row attend to each other; padding instead")
    return functools.partial(collate, pad_id=pad_id, packed=packed)


def target_tokens(example: dict) -> int:
    """Tokens that contribute to the loss: labels other than -100 after the one-position shift."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


def collate_preferences(examples: Sequence[dict], pad_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """B preference pairs -> one batch of 2B rows: the B chosen rows, then the B rejected rows.

    Right-padded to the longest of all 2B sequences, like collate_sft, so one forward scores both
    sides and rows b and B + b are the two answers to the same prompt.
    [{"chosen_ids": [5, 6, 7], "chosen_labels": [-100, 6, 7], "rejected_ids": [5, 8], "rejected_labels": [-100, 8]}],
    pad 0 ->
      input_ids      [[5, 6, 7], [5, 8, 0]]
      attention_mask [[1, 1, 1], [1, 1, 0]]
      labels         [[-100, 6, 7], [-100, 8, -100]]
    packed: the 2B sequences in one row in that order (collate_packed), sequence_ids 0..2B-1.
    """
    rows = [{"input_ids": e[f"{side}_ids"], "labels": e[f"{side}_labels"]}
            for side in ("chosen", "rejected") for e in examples]
    return collate_sft(rows, pad_id, packed)

