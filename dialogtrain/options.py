"""Resolved options of a run: a few small typed dataclasses, the contract of `RUN/run.json`.

The launcher builds them from flags and `--config FILE` (flag names with `-` become field names
with `_`), validates them all at once and writes them; every worker reads them back with
`RunOptions.load(RUN/run.json)`. Torch-free, so the launcher stays instant.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dialogtrain.errors import UserError
from dialogtrain.formatting import CHAT_TEMPLATE_NAMES

PRECISIONS = ("fp32", "fp16", "bf16")
OFFLOADS = ("none", "optimizer", "optimizer+param")
DPO_LOSSES = ("sigmoid", "ipo", "hinge")


class OptionsError(UserError):
    """Every problem of one command line, each naming its flag."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n  ".join(["invalid options:", *problems]))


def flag(name: str) -> str:
    """Field name -> the flag a user types: `micro_batch` -> `--micro-batch`."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ModelOptions:
    model: str = ""
    ref_model: str | None = None
    trust_remote_code: bool = False
    chat_template: str | None = None  # a name of CHAT_TEMPLATE_NAMES or a Jinja file; None: the model's

    def problems(self) -> list[str]:
        out = [] if self.model else [f"{flag('model')} is required"]
        if self.chat_template and self.chat_template not in CHAT_TEMPLATE_NAMES \
                and not Path(self.chat_template).is_file():
            out.append(f"{flag('chat_template')} {self.chat_template}: neither {', '.join(CHAT_TEMPLATE_NAMES)} "
                       f"nor a template file")
        return out


@dataclass(frozen=True)
class DataOptions:
    data: str = ""
    eval_data: str | None = None
    max_length: int = 512
    skip_bad_rows: bool = False
    group_by_length: bool = False
    packing: bool = True

    def problems(self) -> list[str]:
        out = [] if self.data else [f"{flag('data')} is required"]
        if self.max_length < 8:
            out.append(f"{flag('max_length')} must be at least 8, got {self.max_length}")
        return out


@dataclass(frozen=True)
class OptimOptions:
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch: int = 4
    grad_accum: int = 1
    precision: str = "fp32"
    zero: int = 0
    offload: str = "none"
    gradient_checkpointing: bool = False

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
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 42
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate at the end only
    save_every: int = 0  # 0: no intermediate checkpoints
    keep_last: int = 0  # 0: keep every checkpoint

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
    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    precompute_ref: bool = False

    def problems(self) -> list[str]:
        out = []
        if not self.beta > 0:
            out.append(f"{flag('beta')} must be > 0, got {self.beta}")
        if self.loss not in DPO_LOSSES:
            out.append(f"{flag('loss')} must be one of {'|'.join(DPO_LOSSES)}, got {self.loss!r}")
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
    output: str = ""
    gpus: str = "all"  # "0,1,3" | "all" | "cpu"
    nproc: int = 1  # processes when gpus == "cpu"
    ds_config: str | None = None
    max_restarts: int = 0  # torchrun restarts every worker up to this many times after a failure
    # Several nodes. run.json holds what is the same on every node, so each node writes it identically;
    # --node-rank (different on each node) and --master-port are flags of the launch only.
    nnodes: int = 1  # machines, each running the same `dialogtrain` command (torchrun static rendezvous)
    master_addr: str | None = None  # address of node 0, which every node can reach
    hostfile: str | None = None  # `host slots=K` lines: start every host through the deepspeed launcher
    resume: str | None = None  # "auto" (the latest checkpoint of --output, if any) or a checkpoint folder
    resume_force: bool = False  # resume although the data or options differ from the checkpoint's

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
