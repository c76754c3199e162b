"""The export of a LoRA run: the adapters merged into the base weights, and the PEFT adapter beside them.

    RUN/final/                 a plain Hugging Face folder (export.hf): base + (alpha/r) B A in every adapted
                               layer, in the run's export dtype (QLoRA: the 4-bit base dequantized first)
    RUN/final/adapter/         the PEFT adapter: adapter_config.json, adapter_model.safetensors, for
                               PeftModel.from_pretrained(base, RUN/final/adapter)

The merge runs on rank 0 over the gathered state dict (under ZeRO-3 every weight, the adapters included,
is gathered whole first), on a skeleton of the model built on the meta device: the tensors of the state
dict are assigned to it, so no second copy of the model is allocated besides the adapted layers (copied,
as the merge adds into them). It is done in fp32, then cast to the export dtype; the adapter is saved as
it trained.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

ADAPTER_DIR = "adapter"


def gather_adapted_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The PeftModel's full state dict on rank 0 (None elsewhere), every 4-bit weight dequantized; under
    ZeRO-3 every rank must call it (the weights are gathered one layer at a time)."""
    import torch.distributed as dist

    from dialogtrain.export.hf import gather_state_dict
    from dialogtrain.train.lora import dequantized_state_dict

    if engine.zero_optimization_partition_weights():  # no 4-bit weights at ZeRO-3 (options refuse it)
        return gather_state_dict(engine)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {name: tensor.detach().cpu() for name, tensor in dequantized_state_dict(engine.module).items()}


def adapter_skeleton(base_config, peft_config):
    """A PeftModel of `base_config` with the adapters of `peft_config`, on the meta device (no memory), its
    base config without the quantization settings: what a merged export describes."""
    from transformers import AutoModelForCausalLM

    from dialogtrain.train.lora import with_adapters

    config = copy.deepcopy(base_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return with_adapters(base, copy.deepcopy(peft_config))


def merge_into_base(skeleton, state_dict: dict[str, torch.Tensor], dtype: torch.dtype):
    """(merged transformers model, its state dict in `dtype`): `state_dict` (the PeftModel's, plain
    weights) assigned to `skeleton` in fp32 and the adapters merged in, then cast."""
    from dialogtrain.export.hf import cast_state_dict

    fp32 = cast_state_dict(state_dict, torch.float32)
    # the merge adds into the adapted layers' weights in place: copies, never the trained model's own tensors
    fp32 = {name: t.clone() if ".base_layer." in name else t for name, t in fp32.items()}
    missing, unexpected = skeleton.load_state_dict(fp32, strict=False, assign=True)
    missing = [name for name in missing if not tied_name(skeleton, name)]
    if missing or unexpected:
        raise RuntimeError(f"the adapted model's weights do not fit its skeleton: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    skeleton.get_base_model().tie_weights()
    merged = skeleton.merge_and_unload().to(dtype)  # the model in `dtype` too: save_pretrained records its dtype
    return merged, merged.state_dict()


def tied_name(model, name: str) -> bool:
    """Is `name` a weight the model ties to another (GPT-2's LM head to its embeddings)?"""
    from dialogtrain.train.lora import unwrapped

    tied = getattr(unwrapped(model), "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return any(name.endswith(key) for key in keys)


def save_adapter(skeleton, out_dir: Path, base_model: str) -> Path:
    """`out_dir` as a PEFT adapter folder (adapter_config.json, adapter_model.safetensors), for
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), out_dir)."""
    skeleton.peft_config["default"].base_model_name_or_path = base_model
    skeleton.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def export_merged(peft_model, state_dict: dict[str, torch.Tensor], tokenizer, out_dir: str | Path,
                  dtype: torch.dtype, base_model: str | None = None) -> Path:
    """Write `out_dir` (the merged Hugging Face folder, weights in `dtype`) with `out_dir/adapter` (the PEFT
    adapter of `base_model`, by default the model PEFT wrapped), atomically. `peft_model` gives the configs
    (its weights are not read); `state_dict` is gather_adapted_state_dict's. Call on one process only."""
    from dialogtrain.export.hf import export_hf_checkpoint

    base_model = base_model or peft_model.peft_config["default"].base_model_name_or_path
    config, peft_config = peft_model.get_base_model().config, peft_model.peft_config["default"]
    merged_model, merged = merge_into_base(adapter_skeleton(config, peft_config), state_dict, dtype)
    merged_model.generation_config = copy.deepcopy(peft_model.get_base_model().generation_config)
    adapter = adapter_skeleton(config, peft_config)  # the adapter as trained, not the fp32 copy the merge used
    adapter.load_state_dict(state_dict, strict=False, assign=True)
    return export_hf_checkpoint(merged_model, merged, tokenizer, out_dir,
                                write_more=lambda folder: save_adapter(adapter, folder / ADAPTER_DIR, base_model))


def export_lora_checkpoint(folder: Path, progress: dict, trained: dict[str, torch.Tensor], out_dir: str | Path,
                           trust_remote_code: bool = False) -> Path:
    """The folder RUN/final would hold had a LoRA run ended at checkpoint `folder`: the base model its
    hf/adapter/adapter_config.json names, loaded again as training loaded it (4-bit for QLoRA), the
    checkpoint's `trained` weights (adapters, modules to save) put in, merged in the export dtype."""
    from peft import LoraConfig
    from transformers import AutoConfig, AutoTokenizer

    from dialogtrain.errors import UserError
    from dialogtrain.options import LoraOptions, OptimOptions, RunOptions
    from dialogtrain.train.lora import dequantized_state_dict, quantization_args, with_adapters
    from dialogtrain.train.model import load_model
    from dialogtrain.train.resume import HF_FILES

    hf = folder / HF_FILES
    config = LoraConfig.from_pretrained(str(hf / ADAPTER_DIR))
    saved = progress["options"]
    options = RunOptions(lora=LoraOptions(**{name: saved[name] for name in LoraOptions.__dataclass_fields__}),
                         optim=OptimOptions(precision=saved["precision"]))
    tokenizer = AutoTokenizer.from_pretrained(hf, trust_remote_code=trust_remote_code)
    # the dtype the run held the base in, which its config recorded (fp32, or 16-bit)
    held = str(getattr(AutoConfig.from_pretrained(hf, trust_remote_code=trust_remote_code), "dtype", None) or "float32")
    base = load_model(config.base_model_name_or_path, tokenizer, trust_remote_code, quantization_args(options, "cpu"),
                      dtype=held.removeprefix("torch."))
    model = with_adapters(base, config)
    missing, unexpected = model.load_state_dict(trained, strict=False)
    params = dict(model.named_parameters())
    # QLoRA: DeepSpeed keeps the frozen 4-bit weights' quantization state (X.weight.absmax, ...); it is --model's
    unexpected = [name for name in unexpected if name.split(".weight.")[0] + ".weight" not in params]
    untrained = [name for name, p in params.items() if p.requires_grad and name in missing]
    if unexpected or untrained:
        raise UserError(f"checkpoint {folder}: its weights do not fit the adapters of {hf / ADAPTER_DIR} "
                        f"(unknown: {unexpected[:3]}, missing: {untrained[:3]})")
    return export_merged(model, dequantized_state_dict(model), tokenizer, out_dir, getattr(torch, progress["dtype"]),
                         config.base_model_name_or_path)
