"""Resolved options of a run: a few small typed dataclasses, the contract of `RUN/run.json`.

The launcher builds them from flags and `--config FILE` (flag names with `-` become field names
with `_`), validates them all at once and writes them; every worker reads them back with
`RunOptions.load(RUN/run.json)`. Torch-free, so the launcher stays instant.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dialogtrain.data.templates import CHAT_TEMPLATE_NAMES
from dialogtrain.errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16")
OFFLOADS = ("none", "optimizer", "optimizer+param")


@functools.cache
def preference_loss_names() -> tuple[str, ...]:
    """The keys of train.losses.PREFERENCE_LOSSES, the one list of --loss names, read from that module's
    source: the launcher validates options without importing torch, which the losses need."""
    spec = importlib.util.find_spec("dialogtrain.train.losses")
    for node in ast.parse(Path(spec.origin).read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["PREFERENCE_LOSSES"]:
            return tuple(key.value for key in node.value.keys)
    raise AssertionError("dialogtrain/train/losses.py: no PREFERENCE_LOSSES = {...} literal")


class OptionsError(UserError):
    """Every problem of one command line, each naming its flag."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n  ".join(["invalid options:", *problems]))


def flag(name: str) -> str:
    """Field name -> the flag a user types: `micro_batch` -> `--micro-batch`."""
    return "--" + name.replace("_", "-")


def option(default: Any, help: str, metavar: str | None = None) -> Any:
    """A field of the run options with its command-line help (and metavar) beside it; launcher.flags
    turns each field into `--field-name`."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True)
class ModelOptions:
    model: str = option("", "Hugging Face model id, local folder or .gguf file to fine-tune (required)", "MODEL")
    trust_remote_code: bool = option(False, "run Python code shipped with the model")
    chat_template: str | None = option(
        None, "chat format: model (its own template; none: DialoGPT style), dialogpt (each turn + EOS), "
        "user-assistant ('user: ...' / 'assistant: ...' lines) or a Jinja template file; the exported "
        "tokenizer keeps it", "NAME|FILE")

    def problems(self) -> list[str]:
        out = [] if self.model else [f"{flag('model')} is required"]
        if self.chat_template and self.chat_template not in CHAT_TEMPLATE_NAMES \
                and not Path(self.chat_template).is_file():
            out.append(f"{flag('chat_template')} {self.chat_template}: neither {', '.join(CHAT_TEMPLATE_NAMES)} "
                       f"nor a template file")
        return out


@dataclass(frozen=True)
class DataOptions:
    data: str = option("", "training data: a file, a folder of files, or a hub id name[:config][@split] "
                       "(required)", "DATA")
    eval_data: str | None = option(None, "evaluation data, in the same forms as --data", "DATA")
    max_length: int = option(512, "tokens per example; longer conversations lose their oldest turns")
    skip_bad_rows: bool = option(False, "drop invalid rows (and count them) instead of stopping")
    group_by_length: bool = option(False, "put examples of similar length in the same step: ~1.5x the tokens/s "
                                   "(little padding computed), but each step sees less varied examples, which "
                                   "can cost learning per step")
    packing: bool = option(True, "run each micro-batch as one row of its examples back to back, each attending "
                           "only to itself, so no padding is computed (same losses and gradients as padded rows); "
                           "--no-packing pads instead  [default: on]")

    def problems(self) -> list[str]:
        out = [] if self.data else [f"{flag('data')} is required"]
        if self.max_length < 8:
            out.append(f"{flag('max_length')} must be at least 8, got {self.max_length}")
        return out


@dataclass(frozen=True)
class OptimOptions:
    lr: float = option(5e-5, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(0, "optimizer steps of linear warm-up before the linear decay to 0")
    grad_clip: float = option(1.0, "clip the gradient norm to this; 0 disables clipping")
    micro_batch: int = option(4, "sequences per process per forward pass")
    grad_accum: int = option(1, "micro-batches accumulated into one optimizer step")
    precision: str = option("fp32", "fp32, bf16 (CPU or GPU) or fp16 (GPU only, dynamic loss scaling)",
                            "|".join(PRECISIONS))
    zero: int = option(0, "ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, "
                       "3 also weights", "0|1|2|3")
    offload: str = option("none", "move optimizer state (ZeRO 1-3) and weights (ZeRO-3) to CPU RAM",
                          "|".join(OFFLOADS))
    gradient_checkpointing: bool = option(False, "recompute each layer's activations in the backward pass "
                                          "instead of keeping them: activation memory of about one layer, "
                                          "about a third more compute")

    def problems(self) -> list[str]:
        out = []
        if not self.lr > 0:
            out.append(f"{flag('lr')} must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            out.append(f"{flag('weight_decay')} must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            out.append(f"{flag('warmup_steps')} must be >= 0, got {self.warmup_steps}")
        if self.grad_clip < 0:
            out.append(f"{flag('grad_clip')} must be >= 0 (0 disables clipping), got {self.grad_clip}")
        for name in ("micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                out.append(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            out.append(f"{flag('precision')} must be one of {'|'.join(PRECISIONS)}, got {self.precision!r}")
        if self.zero not in (0, 1, 2, 3):
            out.append(f"{flag('zero')} must be 0, 1, 2 or 3, got {self.zero}")
        if self.offload not in OFFLOADS:
            out.append(f"{flag('offload')} must be one of {'|'.join(OFFLOADS)}, got {self.offload!r}")
        elif self.offload == "optimizer" and self.zero == 0:
            out.append(f"{flag('offload')} optimizer needs {flag('zero')} 1, 2 or 3 (ZeRO-0 has no offload)")
        elif self.offload == "optimizer+param" and self.zero != 3:
            out.append(f"{flag('offload')} optimizer+param needs {flag('zero')} 3 "
                       "(DeepSpeed ignores parameter offload below ZeRO-3)")
        return out


@dataclass(frozen=True)
class ScheduleOptions:
    epochs: int = option(1, "passes over the training data (--max-steps wins when given)")
    max_steps: int | None = option(None, "stop after this many optimizer steps")
    seed: int = option(42, "seed for shuffling and initialisation")
    log_every: int = option(1, "write metrics.jsonl every N optimizer steps")
    eval_every: int = option(0, "evaluate every N optimizer steps (and at the end); 0: at the end only")
    save_every: int = option(0, "checkpoint every N optimizer steps; 0: final model only")
    keep_last: int = option(0, "keep only the K newest checkpoints; 0 keeps all")

    def problems(self) -> list[str]:
        out = []
        if self.epochs < 1:
            out.append(f"{flag('epochs')} must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"{flag('max_steps')} must be >= 1, got {self.max_steps}")
        for name in ("log_every", "eval_every", "save_every", "keep_last"):
            if getattr(self, name) < 0:
                out.append(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.log_every == 0:
            out.append(f"{flag('log_every')} must be >= 1")
        return out


@dataclass(frozen=True)
class DPOOptions:
    ref_model: str | None = option(None, "frozen reference model  [default: a copy of --model]", "MODEL")
    beta: float = option(0.1, "DPO beta: how strongly the policy is held near the reference")
    loss: str = option("sigmoid", "preference loss (train/losses.py: PREFERENCE_LOSSES)",
                       "|".join(preference_loss_names()))
    label_smoothing: float = option(0.0, "conservative DPO: assumed probability that a preference is flipped")
    rpo_alpha: float = option(0.0, "weight of the chosen responses' NLL added to the DPO loss (RPO); 0 disables")
    precompute_ref: bool = option(False, "compute reference log-probs once before training instead of keeping "
                                  "the reference model")

    def problems(self) -> list[str]:
        out = []
        if not self.beta > 0:
            out.append(f"{flag('beta')} must be > 0, got {self.beta}")
        if self.loss not in preference_loss_names():
            out.append(f"{flag('loss')} must be one of {'|'.join(preference_loss_names())}, got {self.loss!r}")
        if not 0 <= self.label_smoothing < 0.5:
            out.append(f"{flag('label_smoothing')} must be in [0, 0.5), got {self.label_smoothing}")
        elif self.label_smoothing and self.loss != "sigmoid":
            out.append(f"{flag('label_smoothing')} {self.label_smoothing} applies to {flag('loss')} sigmoid only, "
                       f"not {flag('loss')} {self.loss}")
        if self.rpo_alpha < 0:
            out.append(f"{flag('rpo_alpha')} must be >= 0, got {self.rpo_alpha}")
        return out


@dataclass(frozen=True)
class LaunchOptions:
    output: str = option("", "run folder: run.json, ds_config.json, command.sh, metrics.jsonl, checkpoints/, "
                         "final/ (required)", "RUN")
    gpus: str = option("all", "GPU ids (0,1,3), all, or cpu", "IDS|all|cpu")
    nproc: int = option(1, "number of processes with --gpus cpu")
    ds_config: str | None = option(None, "start from your own DeepSpeed config JSON (the flags still set the keys "
                                   "they own)", "FILE")
    max_restarts: int = option(0, "after a worker fails, torchrun restarts all workers up to N times; they "
                               "resume from the last checkpoint")
    # Several nodes. run.json holds what is the same on every node, so each node writes it identically;
    # --node-rank (different on each node) and --master-port are flags of the launch only.
    nnodes: int = option(1, "machines in the run: start the same command on each, with its own --node-rank "
                         "(torchrun static rendezvous)")
    master_addr: str | None = option(None, "address of node 0 that every node reaches (needed with --nnodes "
                                     "above 1)  [default: 127.0.0.1 on one node; with --hostfile, the first "
                                     "host's `hostname -I`]", "ADDR")
    hostfile: str | None = option(None, "start on the hosts of FILE (`host slots=K` lines) through the deepspeed "
                                  "launcher (pdsh over ssh) instead of torchrun", "FILE")
    resume: str | None = option(None, "continue from a checkpoint: auto (the latest in --output; alone, --resume "
                                "means auto) or a checkpoint folder; data and options must match it",
                                "[auto|PATH]")
    resume_force: bool = option(False, "resume although the data or options differ from the checkpoint's")

    def problems(self) -> list[str]:
        out = [] if self.output else [f"{flag('output')} is required"]
        if self.nproc < 1:
            out.append(f"{flag('nproc')} must be >= 1, got {self.nproc}")
        if self.max_restarts < 0:
            out.append(f"{flag('max_restarts')} must be >= 0, got {self.max_restarts}")
        out += self.node_problems()
        if self.resume is not None and not self.resume.strip():
            out.append(f"{flag('resume')} needs auto or a checkpoint folder")
        if self.resume_force and self.resume is None:
            out.append(f"{flag('resume_force')} needs {flag('resume')}")
        return out

    def node_problems(self) -> list[str]:
        """--nnodes / --master-addr / --hostfile: the two multi-node ways exclude each other."""
        out = []
        if self.nnodes < 1:
            out.append(f"{flag('nnodes')} must be >= 1, got {self.nnodes}")
        elif self.nnodes > 1 and self.hostfile:
            out.append(f"{flag('nnodes')} {self.nnodes} and {flag('hostfile')}: the hostfile lists the nodes; "
                       f"give one of them")
        elif self.nnodes > 1 and not self.master_addr:
            out.append(f"{flag('nnodes')} {self.nnodes} needs {flag('master_addr')}: the address of node 0, "
                       f"the same on every node")
        if self.hostfile and self.max_restarts:
            out.append(f"{flag('max_restarts')} needs torchrun; the deepspeed launcher that {flag('hostfile')} "
                       f"uses does not restart workers")
        return out


SECTIONS = {
    "model": ModelOptions,
    "data": DataOptions,
    "optim": OptimOptions,
    "schedule": ScheduleOptions,
    "dpo": DPOOptions,
    "launch": LaunchOptions,
}


@dataclass(frozen=True)
class RunOptions:
    """Everything a worker needs; `world_size` is the number of processes the launcher starts."""

    command: str = "sft"  # "sft" | "dpo"
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    dpo: DPOOptions = field(default_factory=DPOOptions)
    launch: LaunchOptions = field(default_factory=LaunchOptions)
    world_size: int = 1

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: micro-batch x grad-accum x world size."""
        return self.optim.micro_batch * self.optim.grad_accum * self.world_size

    def problems(self) -> list[str]:
        out = []
        for name in SECTIONS:
            if name == "dpo" and self.command != "dpo":
                continue
            out.extend(getattr(self, name).problems())
        if self.world_size < 1:
            out.append(f"world size must be >= 1, got {self.world_size}")
        return out

    @classmethod
    def from_flat(cls, command: str, values: dict[str, Any], world_size: int = 1) -> RunOptions:
        """Build from flag-named values (`micro_batch=4`); unknown keys and bad values are one OptionsError."""
        owner = {f.name: section for section, klass in SECTIONS.items() for f in fields(klass)}
        grouped: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        problems = []
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in owner:
                problems.append(f"unknown option {flag(name)}")
                continue
            grouped[owner[name]][name] = value
        for section, klass in SECTIONS.items():
            for f in fields(klass):
                if f.name in grouped[section]:
                    problem = _type_problem(f, grouped[section][f.name])
                    if problem:
                        problems.append(problem)
                        del grouped[section][f.name]
        options = cls(command=command, world_size=world_size,
                      **{section: klass(**grouped[section]) for section, klass in SECTIONS.items()})
        problems.extend(options.problems())
        if problems:
            raise OptionsError(problems)
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunOptions:
        raw = json.loads(Path(path).read_text())
        return cls(command=raw["command"], world_size=raw["world_size"],
                   **{section: klass(**raw[section]) for section, klass in SECTIONS.items()})


def _type_problem(f: dataclasses.Field, value: Any) -> str | None:
    """Why `value` cannot fill field `f`, or None. Accepts ints for floats and None for optional fields."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        return None if "None" in kind else f"{flag(f.name)} needs a value"
    if kind.startswith("bool"):
        ok = isinstance(value, bool)
    elif kind.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    return None if ok else f"{flag(f.name)} must be {kind.split(' ')[0]}, got {value!r}"
