"""The model's forward pass as the losses read it: logits only where a token is learned, per-sequence log-probs."""

from __future__ import annotations

import torch


def learned_logits(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits where the losses read them: (N, V) at losses.learned_positions(labels), the
    LM head never run elsewhere (for SmolLM2's 49k vocabulary, the head and its log-softmax over every
    position cost a fifth of the step); (B, T, V) everywhere for a model whose forward lacks
    transformers' `logits_to_keep`. losses.sequence_logps takes either.
    A packed batch passes its position ids and no attention mask (collate.collate_packed).
    """
    from dialogtrain.train.losses import learned_positions

    inputs = {name: batch[name] for name in ("input_ids", "attention_mask", "position_ids") if name in batch}
    if keeps_logits(engine.module):
        inputs["logits_to_keep"] = learned_positions(batch["labels"])
    return engine(**inputs).logits


def batch_sequence_logps(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps (S,), n_tokens (S,)) of the S examples of a collated batch, padded or packed."""
    from dialogtrain.train.losses import sequence_logps

    return sequence_logps(learned_logits(engine, batch), batch["labels"], batch.get("sequence_ids"))


def keeps_logits(model: torch.nn.Module) -> bool:
    """Does `model.forward` take a boolean (B, T) `logits_to_keep` (transformers >= 5.x causal LMs)?"""
    import inspect

    from transformers import modeling_utils

    return ("logits_to_keep" in inspect.signature(model.forward).parameters
            and "boolean" in (getattr(modeling_utils, "slice_logits_to_keep", None).__doc__ or ""))
