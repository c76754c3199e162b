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
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, **learned_index(labels),
            "input_tokens": int(mask.sum())}


def collate_packed(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """All examples in one row, one after the other: no padding is computed.

    Each example keeps its own positions (0, 1, ...) and attends to itself only: `cu_seq_lens` (its
    boundaries) and `max_length` go to the attention (train.attention), and a model that reads packed
    rows from restarting positions is checked to (attention.packs_sequences). `sequence_ids` says which
    example each position belongs to. An example's first label becomes -100: the position before it
    belongs to the previous example (a padded row never learns its first token either).
    [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}] ->
      input_ids    [[5, 6, 7, 8, 9]]
      position_ids [[0, 1, 2, 0, 1]]
      labels       [[-100, 6, 7, -100, 9]]
      sequence_ids [[0, 0, 0, 1, 1]]
      cu_seq_lens  [0, 3, 5] (int32), max_length 3, input_tokens 5, and learned_index: keep [0, 1, 3]
      (those positions predict the learned tokens 6, 7 and 9), targets [6, 7, 9], owners [0, 0, 1],
      counts [2, 1]
    """
    ids, labels, positions, owners, bounds = [], [], [], [], [0]
    for k, e in enumerate(examples):
        n = len(e["input_ids"])
        ids += e["input_ids"]
        labels += [IGNORE_INDEX, *e["labels"][1:]]
        positions += range(n)
        owners += [k] * n
        bounds.append(bounds[-1] + n)
    batch = {name: torch.tensor([values], dtype=torch.long) for name, values in
             (("input_ids", ids), ("position_ids", positions), ("labels", labels), ("sequence_ids", owners))}
    return {**batch, **learned_index(batch["labels"], batch["sequence_ids"]),
            "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32),
            "max_length": max(len(e["input_ids"]) for e in examples), "input_tokens": len(ids)}


def learned_index(labels: torch.Tensor, sequence_ids: torch.Tensor | None = None) -> dict:
    """Where the losses read the logits, built here on the CPU so the training step never reads a device
    value to find it out (on a GPU every read stalls the queue):

      keep           what the model computes logits for (its `logits_to_keep`): the positions (N,) of a
                     packed row (sequence_ids given), else a (B, T) bool mask over padded rows, True where the
                     next token is learned
      targets        (N,) the learned token each kept position predicts
      owners         (N,) the sequence it belongs to (0..S-1; row b of padded rows is sequence b)
      counts         (S,) learned tokens per sequence
      num_sequences  S, and target_tokens N, as ints

    labels [[-100, 5, -100, 7]] (one padded row) -> keep [[True, False, True, False]], targets [5, 7],
    owners [0, 0], counts [2], num_sequences 1, target_tokens 2.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)  # (B, T)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if sequence_ids is None:
        sequence_ids = torch.arange(labels.size(0))[:, None].expand_as(labels)
        keep = mask
    else:
        keep = mask[0].nonzero()[:, 0]  # one packed row: positions
    num_sequences = int(sequence_ids.max()) + 1
    owners = sequence_ids[mask]
    return {"keep": keep, "targets": labels[:, 1:][mask[:, :-1]], "owners": owners,
            "counts": torch.bincount(owners, minlength=num_sequences), "num_sequences": num_sequences,
            "target_tokens": len(owners)}


def input_token_count(batch: dict) -> int:
    """Tokens of the examples in a collated batch, padding not counted (the collate counted them)."""
    return batch["input_tokens"]


Collate = Callable[[list[dict]], dict]  # a micro-batch's examples -> its tensors (and a few ints)


def choose_collate(collate: Callable, packing: bool, model, pad_id: int, say: Callable[[str], None]) -> Collate:
    """`collate` (collate_sft or collate_preferences) packed when `packing` (--packing, the default) and the
    model keeps packed examples apart (attention.packs_sequences; `model` is the training engine, so the
    check runs on its device and in its precision), padded otherwise (and `say` why, and which attention
    runs packed rows)."""
    from dialogtrain.train.attention import packed_attention_name, packs_sequences, unpack_attention

    packed = packing and packs_sequences(model)
    if packed:
        say(f"packing: each micro-batch is one row of its examples; attention: "
            f"{packed_attention_name(model, *packing_device_and_dtype(model))}")
    elif packing:
        unpack_attention(model)
        say("packing: off, this model lets examples packed into one row attend to each other; padding instead")
    return functools.partial(collate, pad_id=pad_id, packed=packed)


def packing_device_and_dtype(model) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype a DeepSpeed engine (or a bare model) computes."""
    if hasattr(model, "torch_autocast_enabled") and model.torch_autocast_enabled():
        return model.device, model.torch_autocast_dtype()
    parameter = next(getattr(model, "module", model).parameters())
    return parameter.device, parameter.dtype


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



def mismatched_rows(examples: Sequence[dict], partners: Sequence[dict], max_length: int) -> list[dict]:
    """KTO's KL rows: the prompt of examples[k] followed by the completion of partners[k] (another example of
    the same step), cut at max_length. Examples carry `prompt_length` (encode.encode_ratings).
    [{"input_ids": [1, 2, 3], "labels": [-100, -100, 3], "prompt_length": 2}] with partner
    [{"input_ids": [7, 8, 9], "labels": [-100, 8, 9], "prompt_length": 1}] ->
      [{"input_ids": [1, 2, 8, 9], "labels": [-100, -100, 8, 9]}]
    """
    rows = []
    for example, partner in zip(examples, partners, strict=True):
        prompt, start = example["prompt_length"], partner["prompt_length"]
        ids = example["input_ids"][:prompt] + partner["input_ids"][start:]
        labels = [IGNORE_INDEX] * prompt + partner["labels"][start:]
        rows.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return rows
