"""Consolidated Hugging Face folders: what `chat`, `from_pretrained` and users load.

The folder holds safetensors weights, config, generation config and the tokenizer with its pad
token and a chat template (template-less models get the DialoGPT one, which renders exactly what
they were trained on). It is written under a temporary name and renamed when complete, so a
crash never leaves a half-written `final/`.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch


def gather_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (None elsewhere); under ZeRO-3 every rank must call it.

    ZeRO-3 partitions the weights: DeepSpeed's consolidation gathers them one layer at a time
    and keeps tied parameters (GPT-2's embeddings and LM head) as one tensor.
    """
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {name: tensor.detach().cpu() for name, tensor in engine.module.state_dict().items()}


def export_hf_checkpoint(model, state_dict: dict[str, torch.Tensor], tokenizer, out_dir: str | Path) -> Path:
    """Write `out_dir` as a Hugging Face folder, atomically. Call on one process only."""
    from dialogtrain.data.templates import DIALOGPT_CHAT_TEMPLATE

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = next(iter(state_dict.values())).dtype
    model.config.dtype = dtype
    model.config.use_cache = True
    model.save_pretrained(tmp, state_dict=state_dict)
    generation = model.generation_config
    generation.pad_token_id = tokenizer.pad_token_id
    if generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id
    generation.save_pretrained(tmp)
    if not tokenizer.chat_template:
        tokenizer = copy.copy(tokenizer)  # the caller's tokenizer keeps selecting the DialoGPT path
        tokenizer.chat_template = DIALOGPT_CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, out_dir)
    return out_dir


def replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; an existing `target` is only removed once `new` is in place."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
