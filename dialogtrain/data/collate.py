"""How a micro-batch of examples becomes tensors: packed into one row (the default), or padded rows."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from dialogtrain.data.encode import IGNORE_INDEX


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
    from dialogtrain.train.attention import prepare_for_packing

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

