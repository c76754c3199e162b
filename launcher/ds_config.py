"""The DeepSpeed config of a run: a template (ds_configs/ or the user's `--ds-config`) with every key
the flags own filled in from the RunOptions.

`build_ds_config` is pure and tested against golden JSON; `load_template` does the reading.
What the flags own, what the templates hold and when to use which: ds_configs/README.md.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

from dialogtrain.errors import UserError
from dialogtrain.options import OptionsError, RunOptions

# ds_configs/ beside the package in a checkout (or an editable install); a wheel installs it as data
# files under <prefix>/share/dialogtrain/ (setup.cfg).
_CHECKOUT_TEMPLATES = Path(__file__).resolve().parent.parent / "ds_configs"
TEMPLATES_DIR = _CHECKOUT_TEMPLATES if _CHECKOUT_TEMPLATES.is_dir() else \
    Path(sys.prefix) / "share" / "dialogtrain" / "ds_configs"
OFFLOAD_TEMPLATES = {2: "zero2_offload.json", 3: "zero3_offload.json"}
OFFLOADED_SECTIONS = {
    "none": (),
    "optimizer": ("offload_optimizer",),
    "optimizer+param": ("offload_optimizer", "offload_param"),
}
# --precision -> the dtype torch.autocast computes in (mixed precision: fp32 weights and optimizer state).
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
ADAM_DEFAULTS = {"betas": [0.9, 0.999], "eps": 1e-8}
STEPS_PER_PRINT_NEVER = 2**31 - 1  # the progress bar and metrics.jsonl report steps, not DeepSpeed's log

# Config keys the flags always set, replacing a value in a user's --ds-config, and the flag that sets each.
OWNED_KEYS = {
    "train_batch_size": "--micro-batch x --grad-accum x processes of all nodes",
    "train_micro_batch_size_per_gpu": "--micro-batch",
    "gradient_accumulation_steps": "--grad-accum",
    "fp16.enabled": "--precision",
    "bf16.enabled": "--precision",
    "torch_autocast.enabled": "--precision",
    "torch_autocast.dtype": "--precision",
    "zero_optimization.stage": "--zero",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": "--zero 3 (the export needs it)",
    "gradient_clipping": "--grad-clip",
    "optimizer.params.lr": "--lr",
    "optimizer.params.weight_decay": "--weight-decay",
    "optimizer.params.torch_adam": "--optimizer, --offload",
}
SECTIONS_THAT_ARE_OBJECTS = ("fp16", "bf16", "torch_autocast", "zero_optimization", "optimizer", "scheduler")


def template_name(zero: int, offload: str) -> str:
    """The file in ds_configs/ that a run with `--zero` and `--offload` starts from."""
    if offload != "none" and zero in OFFLOAD_TEMPLATES:
        return OFFLOAD_TEMPLATES[zero]
    return f"zero{zero}.json"


def load_template(options: RunOptions) -> dict:
    """The user's `--ds-config` file when given, else ds_configs/<template_name>. Raises UserError."""
    if options.launch.ds_config:
        return read_ds_config_file(options.launch.ds_config)
    return json.loads((TEMPLATES_DIR / template_name(options.optim.zero, options.optim.offload)).read_text())


def read_ds_config_file(path: str) -> dict:
    """A JSON object from `path`; a missing, unreadable or non-JSON file is a UserError naming --ds-config."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"--ds-config {path}: no such file") from None
    except OSError as err:
        raise UserError(f"--ds-config {path}: cannot read it ({err.strerror})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--ds-config {path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(config, dict):
        raise UserError(f"--ds-config {path}: expected a JSON object, got {type(config).__name__}")
    return config


def build_ds_config(options: RunOptions, template: dict, *, device: str) -> dict:
    """The DeepSpeed config of `options` on `device` ("cuda" or "cpu"), starting from `template` (not
    modified). Pure.

    The flags set the keys in OWNED_KEYS and which offload sections exist; everything else in the
    template (tuning knobs, a user's scheduler, activation checkpointing...) is kept as it is.
    No scheduler section is added: the worker runs its own warm-up/linear-decay schedule from
    --lr and --warmup-steps unless the template names one. Raises OptionsError when a user's
    template cannot be reconciled with the flags (e.g. it offloads what --offload does not ask for).
    """
    template = copy.deepcopy(template)
    problems = template_shape_problems(template, options.launch.ds_config)
    if problems:
        raise OptionsError(problems)
    optim = options.optim
    zero_optimization, problems = zero_section(template.get("zero_optimization", {}), options, device)
    config = {
        "train_batch_size": options.global_batch,
        "train_micro_batch_size_per_gpu": optim.micro_batch,
        "gradient_accumulation_steps": optim.grad_accum,
        **precision_sections(template, optim.precision),
        "zero_optimization": zero_optimization,
        "gradient_clipping": optim.grad_clip,
        "optimizer": optimizer_section(template.get("optimizer", {}), options),
        "steps_per_print": template.get("steps_per_print", STEPS_PER_PRINT_NEVER),
        "wall_clock_breakdown": template.get("wall_clock_breakdown", False),
    }
    config.update({key: value for key, value in template.items() if key not in config})
    problems += consistency_problems(config, options.world_size)
    if problems:
        raise OptionsError(problems)
    return config


def template_shape_problems(template: dict, user_file: str | None) -> list[str]:
    source = f"--ds-config {user_file}" if user_file else "template"
    problems = [f"{source}: '{key}' must be a JSON object, got {template[key]!r}"
                for key in SECTIONS_THAT_ARE_OBJECTS
                if key in template and not isinstance(template[key], dict)]
    zero = template.get("zero_optimization")
    if isinstance(zero, dict):
        problems += [f"{source}: 'zero_optimization.{key}' must be a JSON object, got {zero[key]!r}"
                     for key in ("offload_optimizer", "offload_param")
                     if key in zero and not isinstance(zero[key], dict)]
    optimizer = template.get("optimizer")
    if isinstance(optimizer, dict) and not isinstance(optimizer.get("params", {}), dict):
        problems.append(f"{source}: 'optimizer.params' must be a JSON object, got {optimizer['params']!r}")
    if "bfloat16" in template:
        problems.append(f"{source}: rename the section 'bfloat16' to 'bf16' (--precision sets bf16.enabled)")
    return problems


def precision_sections(template: dict, precision: str) -> dict:
    """The fp16, bf16 and torch_autocast sections of `--precision` (resolved, not auto).

    fp32: all off. bf16, fp16: mixed precision, DeepSpeed's torch_autocast: the weights, gradients and
    optimizer state stay fp32 and the forward and backward run under torch.autocast in that dtype (fp16
    with a dynamic torch GradScaler), so every update reaches the weights the forward reads. pure-bf16:
    DeepSpeed's bf16 mode, bf16 weights with an fp32 master copy in the optimizer: smaller and faster,
    but an update smaller than half a bf16 step of a weight does not reach the forward.
    """
    autocast = AUTOCAST_DTYPES.get(precision)
    return {"fp16": {**template.get("fp16", {}), "enabled": False},
            "bf16": {**template.get("bf16", {}), "enabled": precision == "pure-bf16"},
            "torch_autocast": {**template.get("torch_autocast", {}), "enabled": autocast is not None,
                               **({"dtype": autocast} if autocast else {})}}


def zero_section(template_zero: dict, options: RunOptions, device: str) -> tuple[dict, list[str]]:
    """(zero_optimization, problems): the stage from --zero, offload sections from --offload.

    An offload section the run asks for keeps the template's settings (device, nvme_path...); pinned
    host memory by default on GPUs (the copies to and from the GPU run at full speed). One it does not
    ask for is dropped from our own templates, but is a conflict in a user's file, which we refuse
    rather than silently ignore.
    """
    zero, offload, user_file = options.optim.zero, options.optim.offload, options.launch.ds_config
    section = {"stage": zero, **{k: v for k, v in template_zero.items() if k != "stage"}}
    problems = []
    for name in ("offload_optimizer", "offload_param"):
        given = section.pop(name, None)
        if name in OFFLOADED_SECTIONS[offload]:
            settings = {"device": "cpu", "pin_memory": device == "cuda", **(given or {})}
            if settings["device"] in (None, "none"):
                settings["device"] = "cpu"
            section[name] = settings
        elif user_file and given and given.get("device", "none") not in (None, "none"):
            needed = "optimizer+param --zero 3" if name == "offload_param" else "optimizer"
            problems.append(f"--offload {offload}, but --ds-config {user_file} sets zero_optimization.{name}."
                            f"device {given['device']!r}; pass --offload {needed} or remove that section")
    if zero == 3:
        section["stage3_gather_16bit_weights_on_model_save"] = True
    return section, problems


def optimizer_section(template_optimizer: dict, options: RunOptions) -> dict:
    """AdamW unless the template names another optimizer; --lr and --weight-decay always apply.

    --optimizer adamw (the default) is torch.optim.AdamW (DeepSpeed's `torch_adam`) with its fused
    kernel, on a GPU and on the CPU alike: nothing to compile, and one in-place pass over the weights.
    (Unfused on the CPU, torch's AdamW allocates two temporaries the size of the weights it updates at
    every step: under ZeRO-1-3 that is each rank's flat partition, measured +520 MiB of peak RSS per
    rank for SmolLM2 at ZeRO-3 x2, and a step 4x slower.) With --offload, DeepSpeed's CPU Adam, which is
    made for the offloaded update. --optimizer fused-adam is DeepSpeed's FusedAdam, which DeepSpeed
    JIT-builds on a GPU with the CUDA toolkit (nvcc) on the first run.
    """
    kind = str(template_optimizer.get("type", "AdamW"))
    params = dict(template_optimizer.get("params", {}))
    if kind.lower() in ("adam", "adamw"):
        params = {**ADAM_DEFAULTS, **params}
        torch_adam = options.optim.optimizer == "adamw" and options.optim.offload == "none"
        params["torch_adam"] = torch_adam
        if torch_adam:
            params.setdefault("fused", True)
        else:
            params.pop("fused", None)
    params.update(lr=options.optim.lr, weight_decay=options.optim.weight_decay)
    return {**template_optimizer, "type": kind, "params": dict(sorted(params.items()))}


def consistency_problems(config: dict, world_size: int) -> list[str]:
    """What DeepSpeed would reject or silently ignore in a finished config."""
    problems = []
    micro, accum = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    if config["train_batch_size"] != micro * accum * world_size:
        problems.append(f"train_batch_size {config['train_batch_size']} != --micro-batch {micro} x --grad-accum "
                        f"{accum} x {world_size} processes (all nodes)")
    if config["fp16"].get("enabled") and config["bf16"].get("enabled"):
        problems.append("fp16 and bf16 are both enabled")
    zero = config["zero_optimization"]
    if "offload_param" in zero and zero["stage"] != 3:
        problems.append(f"zero_optimization.offload_param needs stage 3, got {zero['stage']}")
    if "offload_optimizer" in zero and zero["stage"] == 0:
        problems.append("zero_optimization.offload_optimizer needs stage 1, 2 or 3")
    return problems


def overridden_settings(template: dict, config: dict) -> list[str]:
    """Values of a user's --ds-config that the flags replaced, one line each ("auto" is not listed)."""
    lines = []
    for path, flag in OWNED_KEYS.items():
        old, new = lookup(template, path), lookup(config, path)
        if old is not None and old != "auto" and old != new:
            lines.append(f"{path} {json.dumps(old)} -> {json.dumps(new)} ({flag})")
    return lines


def lookup(config: dict, dotted: str) -> Any:
    """config["a"]["b"] for "a.b"; None where any part is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
