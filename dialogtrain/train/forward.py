"""The model's forward pass as the losses read it: logits only where a token is learned, per-sequence log-probs."""

from __future__ import annotations

import torch


def learned_logits(engine, batch: dict) -> torch.Tensor:
    """(N, V): the model's logits where the losses read them, the positions collate.learned_index found
    (`keep`), in its order; the LM head runs nowhere else (for SmolLM2's 49k vocabulary, the head and its
    log-softmax over every position cost a fifth of the step). A model whose forward lacks transformers'
    `logits_to_keep` computes them everywhere and they are picked out here.

    A packed row (collate.collate_packed) passes its position ids and no attention mask, and its example
    boundaries (`cu_seq_lens`, `max_length`) under the names transformers' attention functions read
    (train.attention); nothing here reads a value back from the device.
    """
    inputs = {name: batch[name] for name in ("input_ids", "attention_mask", "position_ids") if name in batch}
    packed = "cu_seq_lens" in batch
    if packed:
        inputs.update(cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"],
                      max_length_q=batch["max_length"], max_length_k=batch["max_length"])
    keep = batch["keep"]  # (N,) positions of the packed row, or a (B, T) bool mask of padded rows
    if keeps_logits(engine.module):
        logits = engine(**inputs, logits_to_keep=keep).logits
        return logits[0] if packed else logits  # (1, N, V) -> (N, V); a bool mask gives (N, V) already
    logits = engine(**inputs).logits  # (B, T, V)
    return logits[0, keep] if packed else logits[keep]


def batch_sequence_logps(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps (S,), n_tokens (S,)) of the S examples of a collated batch, padded or packed: the summed
    log-probs (fp32) of each example's learned tokens, and their counts (the collate's, on the CPU)."""
    from dialogtrain.train.losses import per_sequence, target_logps

    logps = target_logps(learned_logits(engine, batch), batch["targets"])  # (N,)
    return per_sequence(logps, batch["owners"], batch["num_sequences"]), batch["counts"]


def keeps_logits(model: torch.nn.Module) -> bool:
    """Does `model.forward` take a boolean (B, T) `logits_to_keep` (transformers >= 5.x causal LMs)? A LoRA
    model (PeftModel) passes it on to the transformers model inside."""
    import inspect

    from transformers import modeling_utils

    from dialogtrain.train.lora import unwrapped

    model = unwrapped(model)

    return ("logits_to_keep" in inspect.signature(model.forward).parameters
            and "boolean" in (getattr(modeling_utils, "slice_logits_to_keep", None).__doc__ or ""))
