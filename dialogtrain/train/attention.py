"""Attention over packed rows (collate.collate_packed): each example attends to itself only.

transformers reads a packed row from position ids that restart at each example and, on its sdpa
path, runs it as one T x T attention under a block-diagonal mask: every query scores every key of
the row before the mask throws away all but its own example's. `per_example_attention` runs each
example's slice of the row as its own causal attention instead, sum of t_i^2 / 2 scores instead of
T^2: for 8 chatterbot conversations (T about 500) on SmolLM2 that is 10-15% of a CPU training step.
Models on other attention paths keep them (flash-attention already works per example from the
position ids). Whatever the path, `packs_sequences` checks the result before a run packs anything.
"""

from __future__ import annotations

import weakref

import torch

PER_EXAMPLE = "dialogtrain_per_example_sdpa"


def per_example_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, run once per example of a packed row.

    query (1, H, T, D), key and value (1, H_kv, T, D) of one packed row without a KV cache, and the
    `position_ids` (1, T) transformers passes down (example_starts splits the row). Anything else
    (padded rows, generation with a cache) is plain sdpa with its mask.
    Returns (output (1, T, H, D), None), as sdpa_attention_forward does.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positions = kwargs.get("position_ids")
    if positions is None or query.size(0) != 1 or positions.shape != (1, query.size(2)) \
            or key.size(2) != query.size(2):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    starts = example_starts(positions)
    outputs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
               for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return torch.cat(outputs, dim=1), None


_last_row: tuple = (lambda: None, [])  # (weak reference to the last packed row's position ids, its starts)


def example_starts(positions: torch.Tensor) -> list[int]:
    """[0, start of each further example, T] of a packed row's position ids (1, T): an example starts
    wherever the positions do not continue by one. Every layer gets the same position-ids tensor, so
    it is read once per forward (one host sync on a GPU), not once per layer."""
    global _last_row
    seen, starts = _last_row
    if seen() is positions:
        return starts
    starts = [0, *((positions[0, 1:] != positions[0, :-1] + 1).nonzero()[:, 0] + 1).tolist(), positions.size(1)]
    _last_row = (weakref.ref(positions), starts)
    return starts


def attend_per_example(model) -> bool:
    """Switch a model on transformers' sdpa path to per_example_attention; True when switched.

    Only the running model changes: a saved config does not record the attention implementation.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(PER_EXAMPLE, per_example_attention)
    AttentionMaskInterface.register(PER_EXAMPLE, sdpa_mask)  # padded rows still get sdpa's mask
    model.set_attn_implementation(PER_EXAMPLE)
    return config._attn_implementation == PER_EXAMPLE


def prepare_for_packing(model) -> bool:
    """Per-example attention where the model runs sdpa; then whether it keeps packed examples apart."""
    attend_per_example(model)
    return packs_sequences(model)


def packs_sequences(model) -> bool:
    """Does the model keep examples packed into one row apart (collate.collate_packed)?

    Measured, not assumed: transformers' own models build a block-diagonal causal mask from position
    ids that restart when no attention mask is given, but a model that ignores them would let each
    example attend to the ones before it, silently. One row [a, b], positions restarting at b, must
    give b the logits b alone gives: its distance from them must be a tenth of what b attending to a
    moves them, at most (the same row with a full attention mask, in a batch of two copies so that
    nothing takes it for a packed row). Runs on the model as loaded, before DeepSpeed wraps it, in
    eval mode; three forwards of at most 2 x 9 tokens.
    """
    import inspect

    if "position_ids" not in inspect.signature(model.forward).parameters:
        return False
    vocab = model.config.vocab_size
    first, second = torch.arange(11, 16) % vocab, torch.arange(21, 25) % vocab
    row = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None]
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            def logits(**inputs):
                out = model(**{name: x.to(device) for name, x in inputs.items()}).logits[0, -len(second):]
                return out.float()

            alone = logits(input_ids=second[None])
            packed = logits(input_ids=row, position_ids=positions)
            attending = logits(input_ids=row.repeat(2, 1), position_ids=positions.repeat(2, 1),
                               attention_mask=torch.ones(2, row.size(1), dtype=torch.long))
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(training)
    return bool((packed - alone).abs().max() <= 0.1 * (attending - alone).abs().max())
