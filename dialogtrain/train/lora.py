"""LoRA and QLoRA (--lora-r, --load-in-4bit): PEFT adapters on the loaded model, which alone train.

    model = load_model(..., quantization_args(options, device))  # QLoRA: the base in 4 bits
    model = add_adapters(model, options)                            # a PeftModel, or `model` unchanged
    world.print(trainable_summary(model))

The frozen base weights get no gradients and no optimizer state (train.engine gives DeepSpeed the
trainable parameters only); a checkpoint holds the trainable weights (train.checkpoints); the DPO
reference is the same model with its adapters disabled (train.reference.AdapterOffReference); the
export merges the adapters into the base (export.adapter).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dialogtrain.errors import UserError, first_line
from dialogtrain.options import RunOptions
from dialogtrain.train.lora_options import LORA_DEFAULT_TARGETS, LoraOptions

if TYPE_CHECKING:
    from peft import LoraConfig

QLORA_EXTRA = "pip install 'dialogtrain[qlora]'  (bitsandbytes)"


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def names(value: str | None) -> list[str] | None:
    """"q_proj, v_proj" -> ["q_proj", "v_proj"]; None stays None."""
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


def lora_config(lora: LoraOptions) -> LoraConfig:
    """PEFT's LoraConfig of the --lora-* options. all-linear is PEFT's own: every linear layer (GPT-2's
    Conv1D included) except the output layer."""
    from peft import LoraConfig

    targets = LORA_DEFAULT_TARGETS if lora.lora_targets == LORA_DEFAULT_TARGETS else names(lora.lora_targets)
    return LoraConfig(r=lora.lora_r, lora_alpha=lora.alpha, lora_dropout=lora.lora_dropout, target_modules=targets,
                      modules_to_save=names(lora.lora_modules_to_save), use_dora=lora.use_dora, bias="none",
                      task_type="CAUSAL_LM")


def add_adapters(model: torch.nn.Module, options: RunOptions) -> torch.nn.Module:
    """`model` with LoRA adapters (a PeftModel whose base weights are frozen) when --lora-r > 0, else
    `model` itself. Target names that match nothing are a UserError naming --lora-targets."""
    if not options.lora.enabled:
        return model
    quiet_bitsandbytes()
    one_4bit_layout(model)
    try:
        return with_adapters(model, lora_config(options.lora))
    except ValueError as err:
        raise UserError(f"--lora-targets {options.lora.lora_targets} / --lora-modules-to-save "
                        f"{options.lora.lora_modules_to_save}: {first_line(err)}") from None


def with_adapters(model: torch.nn.Module, config: LoraConfig) -> torch.nn.Module:
    """PEFT's get_peft_model, without the warnings it gives on every run."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT asks transformers a deprecated question
        warnings.filterwarnings("ignore", "fan_in_fan_out is set to False")  # GPT-2's Conv1D: PEFT sets it
        return get_peft_model(model, config)


def trainable_summary(model: torch.nn.Module) -> str:
    """"training 12,288 of 1,060,864 parameters (1.16%)": parameters with gradients (a 4-bit weight
    counted as the parameters it holds, not its packed bytes; a tied weight once)."""
    if is_peft_model(model):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        params = {id(p): p for p in model.parameters()}.values()
        trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    return f"training {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


def quantizable_parameters(model: torch.nn.Module) -> int:
    """Parameters that --load-in-4bit holds in 4 bits: the weights of linear layers (GPT-2's Conv1D too),
    the output layer excepted (transformers keeps it in full precision)."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    return sum(module.weight.numel() for module in model.modules()
               if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel (adapters injected), or `model`."""
    return model.get_base_model() if is_peft_model(model) else model


# ----------------------------------------------------------------------------------------------------
# QLoRA


def quiet_bitsandbytes() -> None:
    """bitsandbytes warns at import, on every CPU run, that an optional kernels package is missing."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def quantization_args(options: RunOptions, device: torch.device) -> dict | None:
    """The from_pretrained arguments of --load-in-4bit: transformers' BitsAndBytesConfig (NF4, double
    quantization, compute in the run's precision) and the device to quantize on; None without it.
    UserError, naming the package, when bitsandbytes is missing or cannot run 4-bit layers on `device`:
    checked by quantizing and multiplying one small block there."""
    if not options.lora.load_in_4bit:
        return None
    quiet_bitsandbytes()
    try:
        import bitsandbytes
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise UserError(f"--load-in-4bit needs bitsandbytes, which is not installed ({first_line(err)}): "
                        f"{QLORA_EXTRA}") from None
    compute = getattr(torch, options.optim.compute_dtype)  # 4-bit weights are dequantized to it for each matmul
    why = bitsandbytes_problem(torch.device(device), compute)
    if why:
        raise UserError(f"--load-in-4bit: bitsandbytes {bitsandbytes.__version__} cannot run 4-bit layers on "
                        f"{device} ({why}); run without --load-in-4bit (LoRA on the full-precision base), or "
                        f"where bitsandbytes supports the device")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute)
    return {"quantization_config": config, "device_map": {"": str(device)}}


def bitsandbytes_problem(device: torch.device, compute: torch.dtype) -> str | None:
    """Why bitsandbytes cannot quantize a 64 x 64 block to NF4 and multiply with it on `device`, or None."""
    try:
        import bitsandbytes as bnb

        weight = torch.linspace(-1, 1, 64 * 64).reshape(64, 64)
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=compute, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        out = layer(torch.ones(2, 64, device=device, dtype=compute))
        expected = torch.ones(2, 64) @ weight.T
        if not torch.allclose(out.float().cpu(), expected, atol=0.2 * float(expected.abs().max())):
            return "its 4-bit matmul gave wrong results"
    except Exception as err:  # noqa: BLE001 - any failure of the library means "not supported here"
        return f"{type(err).__name__}: {first_line(err)}"
    return None


def one_4bit_layout(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit weights in the layout they were quantized in. On a CPU with AVX512-BF16 a
    layer's first forward in eval mode without gradients (the packing check, an evaluation, the DPO
    reference) repacks its weight for an inference kernel, for good, and the round trip back (to save it,
    to merge it) does not restore the quantization state bit for bit: a run would then export weights that
    `dialogtrain export` of its checkpoint (quantizing --model afresh) cannot reproduce."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def dequantized_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every 4-bit weight (bitsandbytes Params4bit) dequantized to the dtype it was
    quantized from and its quantization state entries (absmax, quant_map, ...) dropped: the plain weights
    a merged export holds. A model without 4-bit weights gives its state dict as it is."""
    state = model.state_dict()  # first: it turns bitsandbytes' CPU-packed layout back into the plain one
    quantized = {name: p for name, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    if not quantized:
        return state
    import bitsandbytes as bnb

    plain = {name: t for name, t in state.items() if not any(name.startswith(q + ".") for q in quantized)}
    for name, weight in quantized.items():
        plain[name] = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).cpu()
    return plain


def save_adapter_config(model: torch.nn.Module, folder: Path) -> list[str]:
    """A LoRA model's adapter_config.json in folder/adapter (with the base model it adapts: what rebuilds its
    adapters, e.g. for `dialogtrain export` of a checkpoint); [] for any other model. Returns the files."""
    if not is_peft_model(model):
        return []
    from dialogtrain.export.adapter import ADAPTER_DIR

    model.peft_config["default"].save_pretrained(str(folder / ADAPTER_DIR))
    return [str(folder / ADAPTER_DIR / "adapter_config.json")]
