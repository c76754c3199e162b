"""`dialogtrain plan`: the memory each ZeRO stage and offload choice needs per GPU, and the one to use.

    dialogtrain plan --model M --gpus 8 --nnodes 2 [--gpu-memory 80]

The numbers are DeepSpeed's own estimators of model states (weights, gradients, optimizer state), the
functions behind `estimate_zero2_model_states_mem_needs_all_cold` (stage_1_and_2) and
`estimate_zero3_model_states_mem_needs_all_cold` (stage3), fed with parameter counts of a model built
on the meta device from its config: nothing is downloaded but the config, nothing is allocated. They
assume 16-bit weights with fp32 master weights, fp32 gradients and Adam's two fp32 moments (2 + 18
bytes per parameter before sharding) and, for CPU RAM, a 1.5x buffer. Activations come on top.

ZeRO-0 and ZeRO-1 have no estimator in DeepSpeed; they are computed with the same accounting:
ZeRO-0 is ZeRO-2's estimate on one GPU (nothing sharded), ZeRO-1 keeps the 16-bit gradients (2 bytes
per parameter) whole on every GPU and shards the rest like ZeRO-2. Workers load the whole model on
every process before DeepSpeed partitions it (no `deepspeed.zero.Init`), so the ZeRO-3 estimates are
the estimator's `zero_init=False` ones.

With LoRA (--lora-r) the estimators are fed the adapters' parameters (the only ones with gradients and
optimizer state), and the frozen base adds its 16-bit weights: whole on every GPU at ZeRO 0-2, sharded
at ZeRO-3 (in CPU RAM with parameter offload). With QLoRA (--load-in-4bit) the base's linear layers
take NF4_BYTES per parameter and ZeRO-3 is not offered (4-bit weights cannot be partitioned). The
one-time CPU buffer of loading the base is not counted.
"""

from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass

from dialogtrain.errors import UserError
from dialogtrain.options import LoraOptions, RunOptions

GiB = 1024**3
# QLoRA: bytes per parameter of an NF4 weight with double quantization: 4 bits, an 8-bit scale per block
# of 64, an fp32 scale of those per 256 blocks.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Model states may take this share of a GPU; the rest is for activations, buffers and the CUDA context.
GPU_SHARE = 0.8
# Fastest first (Hugging Face's DeepSpeed guide: stage 0 > 1 > 2 > 2 + offload > 3 > 3 + offloads).
# ZeRO-1 with offload is listed but never recommended: ZeRO-2 with offload needs less for the same transfers.
CHOICES = [(0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"), (3, "none"),
           (3, "optimizer"), (3, "optimizer+param")]
SPEED_ORDER = [(0, "none"), (1, "none"), (2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"),
               (3, "optimizer+param")]


@dataclass(frozen=True)
class ParameterCounts:
    """total: parameters, a tied weight counted once. largest_layer: the most parameters one module holds
    itself (ZeRO-3 gathers a layer at a time). LoRA: `trainable`, the adapters' parameters (None: all
    train), beside the frozen base's `total`; QLoRA: `quantized`, the base parameters held in 4 bits."""

    total: int
    largest_layer: int
    trainable: int | None = None
    quantized: int = 0


@dataclass(frozen=True)
class Estimate:
    """Model-state bytes of one ZeRO stage and offload choice: per GPU, and CPU RAM per node."""

    zero: int
    offload: str
    gpu_bytes: int
    cpu_bytes: int

    @property
    def flags(self) -> str:
        return f"--zero {self.zero}" + (f" --offload {self.offload}" if self.offload != "none" else "")


def count_parameters(model: str, trust_remote_code: bool = False, lora: LoraOptions | None = None) -> ParameterCounts:
    """Parameter counts of `model` (folder, hub id or .gguf) from its config, built on the meta device;
    with `lora` (--lora-r > 0), PEFT's adapters are added to it there and counted."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dialogtrain.errors import first_line
    from dialogtrain.train.model import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {model}: cannot read its config ({first_line(err)})") from None
    with torch.device("meta"):  # shapes only: no memory, no weights read
        lm = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in lm.parameters())  # parameters() yields a tied weight once
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in lm.modules())
    if not (lora and lora.enabled):
        return ParameterCounts(total, largest)
    from dialogtrain.train.lora import add_adapters, quantizable_parameters

    quantized = quantizable_parameters(lm) if lora.load_in_4bit else 0
    with torch.device("meta"):
        adapted = add_adapters(lm, RunOptions(lora=lora))
    return ParameterCounts(total, largest, adapted.get_nb_trainable_parameters()[0], quantized)


def estimate_memory(counts: ParameterCounts, gpus_per_node: int, nnodes: int) -> list[Estimate]:
    """One Estimate per CHOICES entry, for `gpus_per_node` GPUs on each of `nnodes` nodes."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total = counts.total if counts.trainable is None else counts.trainable  # what has gradients and Adam state
    gpus = gpus_per_node * nnodes

    def zero2(offload: bool, gpus_per_node: int = gpus_per_node, nnodes: int = nnodes) -> tuple[int, int]:
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nnodes, cpu_offload=offload)
        return gpu, cpu

    def zero3(offload: bool, offload_params: bool) -> tuple[int, int]:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, counts.largest_layer, gpus_per_node, nnodes, cpu_offload=offload,
            cpu_offload_params=offload_params, zero_init=False)
        return gpu, cpu

    (gpu2, cpu2), (gpu2_offload, cpu2_offload) = zero2(False), zero2(True)
    unsharded_gpu = zero2(False, 1, 1)[0]  # ZeRO-2 over one GPU shards nothing: ZeRO-0
    gpu1 = 4 * total + int(16 * total / gpus)  # 16-bit weights and gradients whole, the rest sharded
    by_choice = {  # (zero, offload): (bytes per GPU, bytes of CPU RAM per node)
        (0, "none"): (unsharded_gpu, cpu2),
        (1, "none"): (gpu1, cpu2),
        (1, "optimizer"): (gpu2_offload + 2 * total, cpu2_offload),  # + the whole 16-bit gradients
        (2, "none"): (gpu2, cpu2),
        (2, "optimizer"): (gpu2_offload, cpu2_offload),
        (3, "none"): zero3(False, False),
        (3, "optimizer"): zero3(True, False),
        (3, "optimizer+param"): zero3(True, True),
    }
    if counts.trainable is not None:  # LoRA: the frozen base's weights come on top
        base = 2 * (counts.total - counts.quantized) + math.ceil(NF4_BYTES * counts.quantized)
        by_choice = {(zero, offload): (gpu + base, cpu) if zero < 3 else
                     (gpu, cpu + base // nnodes) if offload == "optimizer+param" else (gpu + base // gpus, cpu)
                     for (zero, offload), (gpu, cpu) in by_choice.items() if zero < 3 or not counts.quantized}
    return [Estimate(zero, offload, *by_choice[zero, offload]) for zero, offload in CHOICES
            if (zero, offload) in by_choice]


def recommend(estimates: list[Estimate], gpu_bytes: int, cpu_bytes: int) -> Estimate | None:
    """The fastest choice (SPEED_ORDER) whose model states fit GPU_SHARE of one GPU and the RAM of a node."""
    by_choice = {(e.zero, e.offload): e for e in estimates}
    for choice in SPEED_ORDER:
        estimate = by_choice.get(choice)  # QLoRA has no ZeRO-3
        if estimate and estimate.gpu_bytes <= GPU_SHARE * gpu_bytes and estimate.cpu_bytes <= cpu_bytes:
            return estimate
    return None


def gpu_memory() -> int | None:
    """Bytes of the smallest GPU `nvidia-smi` lists here, or None without one."""
    if os.environ.get("DIALOGTRAIN_FAKE_GPUS") is not None:
        return None  # tests: no real GPU is to be asked
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sizes = [int(line) for line in listing.stdout.split() if line.strip().isdigit()]
    return min(sizes) * 1024**2 if listing.returncode == 0 and sizes else None  # MiB


def cpu_memory() -> int:
    """Bytes of RAM of this machine (the other nodes are assumed alike)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB', 3 * 2**30 -> '3.00 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def plan_report(model: str, gpus_per_node: int, nnodes: int = 1, gpu_bytes: int | None = None,
                cpu_bytes: int | None = None, trust_remote_code: bool = False, lora: LoraOptions | None = None) -> str:
    """The text `dialogtrain plan` prints: counts, one line per choice, and the recommendation."""
    counts = count_parameters(model, trust_remote_code, lora)
    estimates = estimate_memory(counts, gpus_per_node, nnodes)
    gpu_bytes = gpu_bytes if gpu_bytes is not None else gpu_memory()
    cpu_bytes = cpu_bytes if cpu_bytes is not None else cpu_memory()
    gpus = "GPU" if gpus_per_node == 1 else "GPUs"
    nodes = "node" if nnodes == 1 else "nodes"
    lines = [f"{model}: {counts.total:,} parameters, largest layer {counts.largest_layer:,}; "
             f"{gpus_per_node} {gpus} per node x {nnodes} {nodes} = {gpus_per_node * nnodes} GPUs",
             "model states (DeepSpeed's estimators: 16-bit weights, fp32 master weights, gradients and Adam state; "
             "activations come on top)",
             *([lora_line(counts, lora)] if counts.trainable is not None else []),
             "",
             f"  {'flags':<36} {'per GPU':>12} {'CPU RAM per node':>18}"]
    lines += [f"  {e.flags:<36} {format_bytes(e.gpu_bytes):>12} {format_bytes(e.cpu_bytes):>18}" for e in estimates]
    lines.append("")
    lines.append(recommendation_line(estimates, gpu_bytes, cpu_bytes))
    return "\n".join(lines)


def lora_line(counts: ParameterCounts, lora: LoraOptions) -> str:
    base = ("the frozen base's linear layers in 4 bits (NF4), the rest 16-bit; no ZeRO-3" if counts.quantized
            else "the frozen base in 16-bit weights")
    return (f"LoRA --lora-r {lora.lora_r} --lora-targets {lora.lora_targets}: {counts.trainable:,} adapter parameters "
            f"train ({100 * counts.trainable / counts.total:.2f}% of the base), {base}")


def recommendation_line(estimates: list[Estimate], gpu_bytes: int | None, cpu_bytes: int) -> str:
    if gpu_bytes is None:
        return "recommended: give --gpu-memory GiB (no GPU here to measure) for a recommendation"
    budget = (f"{GPU_SHARE:.0%} of {format_bytes(gpu_bytes)} per GPU (the rest for activations) and "
              f"{format_bytes(cpu_bytes)} of RAM per node")
    chosen = recommend(estimates, gpu_bytes, cpu_bytes)
    if chosen is None:
        return f"recommended: none fits {budget}; add GPUs or nodes"
    return f"recommended: {chosen.flags}, the fastest that fits {budget}"
