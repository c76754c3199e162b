"""A saved DeepSpeed checkpoint -> the Hugging Face folder RUN/final would be had training ended there."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from dialogtrain.errors import UserError, first_line
from dialogtrain.train.checkpoints import safe_torch_load
from dialogtrain.train.resume import HF_FILES, verified_checkpoint


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """Write the Hugging Face folder of a saved checkpoint (any ZeRO stage) to `out_dir`, offline: the same
    folder RUN/final holds when training ends at that step (weights in the training precision)."""
    import torch

    from dialogtrain.export.hf import cast_state_dict, export_hf_checkpoint

    folder, progress = verified_checkpoint(str(checkpoint))  # a damaged file stops the export, naming it
    with safe_torch_load():
        state_dict = consolidated_state_dict(folder, progress["zero"])
    if progress["options"].get("lora_r"):  # a LoRA checkpoint holds the trained weights only
        from dialogtrain.export.adapter import export_lora_checkpoint

        return export_lora_checkpoint(folder, progress, state_dict, out_dir, trust_remote_code)
    dtype = getattr(torch, progress["dtype"])
    state_dict = cast_state_dict(state_dict, dtype)
    model, tokenizer = model_skeleton(folder / HF_FILES, dtype, trust_remote_code)
    return export_hf_checkpoint(model, state_dict, tokenizer, out_dir)


def consolidated_state_dict(folder: Path, zero: int) -> dict:
    """The full state dict of a checkpoint: ZeRO-0 holds it whole in its model states; ZeRO 1-3 are
    consolidated from the fp32 master weights of every shard by DeepSpeed's zero_to_fp32, which also
    restores tied parameters (GPT-2's LM head is its embedding) as one tensor."""
    import torch

    if zero == 0:
        states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return states["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


def model_skeleton(hf_files: Path, dtype, trust_remote_code: bool):
    """(model on the meta device in `dtype`, tokenizer) from a checkpoint's hf/ folder: the config,
    generation config and tokenizer export_hf_checkpoint writes beside the weights (save_pretrained records
    the model's dtype); no weights are allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(hf_files, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code).to(dtype)
        model.generation_config = GenerationConfig.from_pretrained(hf_files)
        tokenizer = AutoTokenizer.from_pretrained(hf_files, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        hint = " (it needs --trust-remote-code)" if "trust_remote_code" in str(err) else ""
        raise UserError(f"{hf_files}: cannot rebuild the model from its config and tokenizer{hint}: "
                        f"{first_line(err)}") from None
    return model, tokenizer
