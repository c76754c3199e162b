"""The DeepSpeed engine both loops train on: its config, initialisation, schedule and optimizer step."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch


def read_ds_config(path: Path, total_steps: int) -> dict:
    """RUN/ds_config.json, with a scheduler's `total_num_steps: "auto"` set to the planned steps."""
    config = json.loads(Path(path).read_text())
    params = config.get("scheduler", {}).get("params", {})
    if params.get("total_num_steps") == "auto":
        params["total_num_steps"] = total_steps
    return config


def warmup_linear_decay(warmup_steps: int, total_steps: int):
    """LR factor of optimizer step s (0-based): linear warm-up to 1, then linear decay towards 0.

        f(s) = (s + 1) / warmup_steps          for s < warmup_steps
        f(s) = (total - s) / (total - warmup)  after, so the last step still learns (f > 0)

    Unlike a warm-up that starts at exactly 0, no step is wasted, and `--warmup-steps 0` means
    full learning rate from the first step.
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


# ZeRO sizes (in parameters) that "auto" in a template or --ds-config stands for, from the model's hidden
# size h: the first three follow transformers' DeepSpeed integration, with a floor so a tiny model does not
# make a collective call per layer. Each sized bucket is a buffer every rank allocates (reduce_bucket_size
# 5e8 is 2 GB of fp32 per rank) and ZeRO-3 keeps up to max_live_parameters gathered, so these sizes are
# what lets ZeRO-3 hold less per rank than one full replica.
BUCKET_FLOOR = 2**20
PERSISTENCE_FLOOR = 100_000  # DeepSpeed's default: a tiny model stays whole instead of gathering every layer
AUTO_ZERO_SIZES = {
    "reduce_bucket_size": lambda h: max(h * h, BUCKET_FLOOR),
    "allgather_bucket_size": lambda h: max(h * h, BUCKET_FLOOR),
    "stage3_prefetch_bucket_size": lambda h: max(int(0.9 * h * h), BUCKET_FLOOR),
    "stage3_param_persistence_threshold": lambda h: max(10 * h, PERSISTENCE_FLOOR),
    "stage3_max_live_parameters": lambda h: max(10 * h * h, 10 * BUCKET_FLOOR),
    "stage3_max_reuse_distance": lambda h: max(10 * h * h, 10 * BUCKET_FLOOR),
}


def resolve_auto_sizes(ds_config: dict, hidden: int | None) -> dict:
    """`ds_config` with every "auto" of AUTO_ZERO_SIZES in `zero_optimization` set from the hidden size;
    without a hidden size (a model config that lacks one) the key is dropped: DeepSpeed's default applies."""
    config = copy.deepcopy(ds_config)
    zero = config.get("zero_optimization", {})
    for key, size in AUTO_ZERO_SIZES.items():
        if zero.get(key) == "auto":
            if isinstance(hidden, int) and hidden > 0:
                zero[key] = size(hidden)
            else:
                del zero[key]
    return config


def hidden_size(model: torch.nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "hidden_size", None)


def build_engine(model: torch.nn.Module, ds_config: dict, warmup_steps: int, total_steps: int):
    """`deepspeed.initialize` with the run's config ("auto" ZeRO sizes resolved). Returns
    (engine, lr_scheduler).

    The schedule is ours (`warmup_linear_decay`) unless the user's DeepSpeed config names its own.
    """
    import deepspeed

    config = resolve_auto_sizes(ds_config, hidden_size(model))
    scheduler = None
    if "scheduler" not in config:
        def make_scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(warmup_steps, total_steps))

        scheduler = make_scheduler
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, lr_scheduler = deepspeed.initialize(model=model, model_parameters=params, config=config,
                                                      lr_scheduler=scheduler)
    share_fp32_master_weights(engine.optimizer)
    return engine, lr_scheduler


def share_fp32_master_weights(optimizer) -> int:
    """Under ZeRO-3 with fp32 weights and no offload, let the optimizer update the weight partition itself
    instead of a second fp32 copy of it. Returns the bytes freed per rank.

    DeepSpeed 0.19 means to share them (the weights are already in the master dtype), but its check compares
    the partition's `torch.device` with its own device *string* ("cpu", "cuda:0"), which is never equal, so
    every rank keeps a clone: 4 more bytes per parameter of its partition. The shared tensor keeps its
    identity (the optimizer's param groups and state are keyed by it); DeepSpeed's copy of the master
    weights back into the partition after each step becomes a copy onto itself.
    """
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    weights = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    if not masters or not weights or getattr(optimizer, "offload_optimizer", False) \
            or getattr(optimizer, "params_in_nvme_and_cpu", False):
        return 0
    freed = 0
    for master, weight in zip(masters, weights):
        if (master.data_ptr() != weight.data_ptr() and master.dtype == weight.dtype
                and master.device == weight.device and master.shape == weight.shape):
            master.data = weight.data
            freed += weight.numel() * weight.element_size()
    return freed


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])


def grad_scaler(engine):
    """torch's GradScaler of an fp16 mixed-precision run (DeepSpeed's torch_autocast), or None."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None) \
        or getattr(engine.optimizer, "torch_autocast_gradscaler", None)


def optimizer_step(engine) -> tuple[float, bool]:
    """`engine.step()` for the last micro-batch of an optimizer step. Returns (the gradient norm before
    clipping, whether the update was applied): fp16 skips an update whose gradients overflowed.

    DeepSpeed reports the norm for ZeRO and pure bf16; at ZeRO-0 otherwise it is computed here from the
    gradients, which `engine.backward` has already all-reduced. With fp16 mixed precision (a GradScaler
    multiplies the loss by its scale S) DeepSpeed 0.19.8 needs three corrections, made here:
    - the gradients, and so the norms it reports and the one computed here, are S times too large;
    - ZeRO 1-3 clip against that scaled norm before the GradScaler divides by S, which would shrink
      every clipped update S times: their clip threshold is set to S x --grad-clip for the step;
    - ZeRO 1-3 skip an overflowing step themselves without telling the GradScaler, whose scale would
      then never come down: it is lowered here as the GradScaler would; at ZeRO-0 the GradScaler skips
      the update itself but DeepSpeed counts it as applied and advances the LR schedule: the skip is
      counted and the schedule put back, so the schedule follows the applied updates.
    """
    scaler = grad_scaler(engine)
    scale = scaler.get_scale() if scaler else 1.0  # one read of a device value per optimizer step
    zero = engine.zero_optimization_stage() > 0
    if scaler and zero:
        engine.optimizer.clip_grad = engine.gradient_clipping() * scale
    plain = not zero and not (engine.bfloat16_enabled() or engine.fp16_enabled())
    norm = gradient_norm(engine.module) / scale if plain else None
    engine.step()
    if not plain:
        reported = engine.get_global_grad_norm()
        norm = float(reported) / scale if reported is not None else math.nan
    applied = engine.was_step_applied()
    if scaler and zero and not applied:
        scaler.update(new_scale=scale * scaler.get_backoff_factor())
    elif scaler and not zero and scaler.get_scale() < scale:  # the GradScaler skipped it
        applied = False
        engine.skipped_steps += 1
        rewind_schedule(engine.lr_scheduler)
    return norm, applied


def rewind_schedule(scheduler) -> None:
    """Undo the last step of a torch LR scheduler (ours is a LambdaLR): its count and the learning rates."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        scheduler.last_epoch -= 2
        scheduler.step()


def gradient_norm(model: torch.nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return math.nan
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
