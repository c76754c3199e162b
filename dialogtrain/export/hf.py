"""Consolidated Hugging Face folders: what `chat`, `from_pretrained` and users load.

The folder holds safetensors weights, config, generation config and the tokenizer with its pad
token and a chat template (template-less models get the DialoGPT one, which renders exactly what
they were trained on). It is written under a temporary name and renamed when complete, so a
crash never leaves a half-written `final/`.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    return convert_state_dict(engine.module.state_dict(), lambda tensor: tensor.detach().cpu())


def convert_state_dict(state_dict: dict[str, torch.Tensor], convert: Callable[[torch.Tensor], torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """`convert` applied to each tensor once, so tied parameters (one tensor under two names: GPT-2's LM head
    is its embedding; state_dict() gives two views of its storage) stay one tensor, also when the conversion
    copies (from a GPU, to another dtype)."""
    def key(tensor: torch.Tensor) -> tuple:
        return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride()) if tensor.numel() else (id(tensor),)

    done: dict[tuple, torch.Tensor] = {}
    for tensor in state_dict.values():
        if key(tensor) not in done:
            done[key(tensor)] = convert(tensor)
    return {name: done[key(tensor)] for name, tensor in state_dict.items()}


def cast_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors in `dtype` (the export's precision), ties kept."""
    return convert_state_dict(state_dict, lambda tensor: tensor.to(dtype) if tensor.is_floating_point() else tensor)


def export_hf_checkpoint(model, state_dict: dict[str, torch.Tensor], tokenizer, out_dir: str | Path,
                         write_more: Callable[[Path], Any] | None = None) -> Path:
    """Write `out_dir` as a Hugging Face folder, atomically (`write_more(folder)` adds files to it before it
    is put in place: a LoRA run's adapter). Call on one process only."""
    from dialogtrain.data.templates import DIALOGPT_CHAT_TEMPLATE

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = next(iter(state_dict.values())).dtype
    model.config.use_cache = True
    model.save_pretrained(tmp, state_dict=state_dict)
    config = copy.deepcopy(model.config)  # save_pretrained records the model's dtype, not the weights'
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(tmp)
    generation = model.generation_config
    generation.pad_token_id = tokenizer.pad_token_id
    if generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id
    generation.save_pretrained(tmp)
    if not tokenizer.chat_template:
        tokenizer = copy.copy(tokenizer)  # the caller's tokenizer keeps selecting the DialoGPT path
        tokenizer.chat_template = DIALOGPT_CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp)
    if write_more:
        write_more(tmp)
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
