"""Attention over packed rows (collate.collate_packed): each example attends to itself only, one call a layer.

A packed row carries its example boundaries, built on the CPU by the collate: `cu_seq_lens` ([0, end of
example 1, ..., T]) and `max_length`, which the forward passes on as transformers' flash-attention
keyword arguments (`cu_seq_lens_q`, `max_length_q`, ...); `packed_attention`, registered as the model's
attention, reads them. Which kernel runs is decided by the device and dtype, and said at start-up:

    GPU, fp16/bf16 compute   torch's varlen flash attention: one kernel over the whole row, no mask
    GPU, fp32 (or dropout)   SDPA with a block-diagonal causal mask made on the GPU from cu_seq_lens
    CPU                      SDPA per example: the sum of t_i^2 / 2 scores instead of a masked T^2
                             (10-15% of a SmolLM2 training step on the CPU, where a call costs nothing)

The attention registers no mask function, so transformers builds no T x T mask and reads nothing back to
find the packing; the row's boundaries are already known. A call without `cu_seq_lens_q` (a single
sequence, or generation) is plain causal SDPA, so with packing on every batch is a packed row
(--no-packing leaves the model's own attention alone). `packs_sequences` checks, through the run's
engine (its device and precision), that a model keeps packed examples apart before a run packs anything.
"""

from __future__ import annotations

import torch

PACKED = "dialogtrain_packed"
VARLEN = "torch varlen flash attention"
BLOCK_MASK = "SDPA with a block-diagonal causal mask"
PER_EXAMPLE = "SDPA per example"


def attention_path(device: torch.device, dtype: torch.dtype, dropout: float = 0.0) -> str:
    """Which kernel runs a packed row's attention on `device` for `dtype` compute."""
    if device.type != "cuda":
        return PER_EXAMPLE
    if dtype in (torch.float16, torch.bfloat16) and dropout == 0.0 and varlen_attention() is not None:
        return VARLEN
    return BLOCK_MASK


def packed_attention_name(model, device: torch.device, dtype: torch.dtype) -> str:
    """What runs a packed row's attention in `model` (an engine, a PEFT model or a bare one), for messages."""
    module = getattr(model, "module", model)
    module = module.get_base_model() if hasattr(module, "get_base_model") else module
    implementation = getattr(module.config, "_attn_implementation", None)
    if implementation == PACKED:
        return attention_path(device, dtype)
    return f"the model's own ({implementation}), which reads the packing from the restarting positions"


def varlen_attention():
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.10), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention interface for packed rows (see the module docstring).

    query (1, H, T, D), key and value (1, H_kv, T, D); kwargs hold cu_seq_lens_q ((S + 1,) int32 on the
    device) and max_length_q (int). Returns (output (1, T, H, D), None), as sdpa_attention_forward does.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    for name in ("cu_seq_lens_k", "max_length_k"):
        kwargs.pop(name, None)
    longest = kwargs.pop("max_length_q", None)
    if bounds is None or query.size(0) != 1 or key.size(2) != query.size(2):
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    dtype = autocast_dtype(query)
    path = attention_path(query.device, dtype, dropout if module.training else 0.0)
    if path == VARLEN:
        varlen_attn = varlen_attention()
        q, k, v = (x[0].transpose(0, 1).to(dtype) for x in (query, key, value))  # (T, H, D)
        out = varlen_attn(q, k, v, bounds, bounds, longest, longest, scale=scaling, window_size=(-1, 0),
                          enable_gqa=k.size(1) != q.size(1))
        return out.unsqueeze(0), None  # (1, T, H, D)
    if path == BLOCK_MASK:
        mask = block_causal_mask(bounds, query.size(2))[None, None]  # (1, 1, T, T)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                      is_causal=False, **kwargs)
    starts = bounds.tolist()  # on the CPU: no device to wait for
    outputs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                      dropout=dropout, scaling=scaling, **kwargs)[0]
               for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return torch.cat(outputs, dim=1), None


def autocast_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype the attention computes in: autocast's where it is on (RoPE may have promoted q and k to
    fp32 in an fp32 residual stream), else the query's."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


def block_causal_mask(bounds: torch.Tensor, length: int) -> torch.Tensor:
    """(T, T) bool: position i may attend to j when both are in the same example and j <= i. From the
    example boundaries (S + 1,) on their device; nothing is read back.

    bounds [0, 2, 3] -> [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    positions = torch.arange(length, device=bounds.device)
    example = torch.searchsorted(bounds[1:].to(torch.int64), positions, right=True)  # (T,) 0..S-1
    return (example[:, None] == example[None, :]) & (positions[:, None] >= positions[None, :])


def attend_packed(model) -> str | None:
    """Switch a model that uses transformers' attention interface to packed_attention; returns the
    implementation it had (to switch back with unpack_attention), None when it could not be switched.

    Only the running model changes: a saved config does not record the attention implementation.
    """
    from transformers import AttentionInterface

    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if previous is None or not hasattr(model, "set_attn_implementation"):
        return None
    AttentionInterface.register(PACKED, packed_attention)
    try:
        model.set_attn_implementation(PACKED)
    except (ValueError, ImportError):
        return None
    return previous if model.config._attn_implementation == PACKED else None


def unpack_attention(model) -> None:
    """Give a model (a DeepSpeed engine's, a PEFT model's base) SDPA back, transformers' default, when it runs
    packed_attention: padded rows need the masks packed_attention does not read."""
    model = getattr(model, "module", model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(model.config, "_attn_implementation", None) == PACKED:
        model.set_attn_implementation("sdpa")


def packs_sequences(model) -> bool:
    """Does the model keep examples packed into one row apart (collate.collate_packed)?

    Measured, not assumed: a model might ignore the boundaries and let each example attend to the ones
    before it, silently. One row [a, b], b's positions restarting, with its boundaries, must give b the
    logits b alone gives: their distance must be a tenth of what b attending to a moves them, at most
    (the same two examples as one sequence). `model` is the DeepSpeed engine the run trains (so the check
    runs on its device and in its precision, ZeRO-3 included: every rank must call it) or a bare model;
    in eval mode, three forwards of at most 9 tokens.
    """
    import inspect

    module = getattr(model, "module", model)
    inner = module.get_base_model() if hasattr(module, "get_base_model") else module  # PEFT passes it on
    if "position_ids" not in inspect.signature(inner.forward).parameters:
        return False
    vocab = module.config.vocab_size
    first, second = torch.arange(11, 16) % vocab, torch.arange(21, 25) % vocab
    row = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None]
    bounds = torch.tensor([0, len(first), row.size(1)], dtype=torch.int32)
    device = getattr(model, "device", None) or next(module.parameters()).device
    training = module.training
    model.eval()
    try:
        with torch.no_grad():
            def logits(**inputs):
                moved = {name: x.to(device) if isinstance(x, torch.Tensor) else x for name, x in inputs.items()}
                return model(**moved).logits[0, -len(second):].float()

            alone = logits(input_ids=second[None])
            packed = logits(input_ids=row, position_ids=positions, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                            max_length_q=len(first), max_length_k=len(first))
            attending = logits(input_ids=row)
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(training)
    return bool((packed - alone).abs().max() <= 0.1 * (attending - alone).abs().max())
