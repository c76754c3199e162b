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

from dialogtrain.data.mixture import MixtureError, parse_sources
from dialogtrain.data.templates import CHAT_TEMPLATE_NAMES
from dialogtrain.loss_facts import (
    COMMAND_DEFAULTS,
    PREFERENCE_COMMANDS,
    options_of_loss,
    preference_loss_names,
    preference_losses,
)
from dialogtrain.option_fields import OptionsError, flag, option, type_problem
from dialogtrain.train.lora_options import LoraOptions  # torch-free
from dialogtrain.train.trackers import TRACKERS, requested_trackers  # torch-free

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "pure-bf16")
OPTIMIZERS = ("adamw", "fused-adam")
OFFLOADS = ("none", "optimizer", "optimizer+param")


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
    data: str = option("", "training data: a file, a folder of files, a hub id name[:config][@split], or a "
                       "mixture drawn by weight each epoch: a.jsonl:0.7,b.yaml:0.3 (the weight follows the last "
                       "':') (required)", "DATA")
    eval_data: str | None = option(None, "evaluation data, in the same forms as --data (weights ignored; each "
                                   "source also gets its own eval_loss/NAME)", "DATA")
    max_length: int = option(512, "tokens per example; longer conversations lose their oldest turns")
    skip_bad_rows: bool = option(False, "drop invalid rows (and count them) instead of stopping")
    keep_duplicates: bool = option(False, "keep exact duplicates (the same turns up to whitespace; pairs: the same "
                                   "prompt, chosen and rejected) instead of dropping all but the first")
    keep_overlap: bool = option(False, "evaluate also the --eval-data examples that occur in --data (pairs: whose "
                                "prompt does) instead of leaving them out")
    eval_split: float = option(0.0, "hold out this fraction of --data as the eval set, after de-duplication and "
                               "sharing no conversation (pairs: no prompt) with training; 0: none", "FRACTION")
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
        for name in ("data", "eval_data"):
            try:
                parse_sources(getattr(self, name) or "x")
            except MixtureError as err:
                out.append(f"{flag(name)} {err}")
        if not 0 <= self.eval_split < 1:
            out.append(f"{flag('eval_split')} must be a fraction in [0, 1), got {self.eval_split}")
        elif self.eval_split and self.eval_data:
            out.append(f"{flag('eval_split')} and {flag('eval_data')}: the eval set comes from one of them; give one")
        if self.keep_overlap and not self.eval_data:
            out.append(f"{flag('keep_overlap')} needs {flag('eval_data')} (an --eval-split never overlaps)")
        return out


@dataclass(frozen=True)
class OptimOptions:
    lr: float = option(5e-5, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(0, "optimizer steps of linear warm-up before the linear decay to 0")
    grad_clip: float = option(1.0, "clip the gradient norm to this; 0 disables clipping")
    micro_batch: int = option(4, "sequences per process per forward pass")
    grad_accum: int = option(1, "micro-batches accumulated into one optimizer step")
    precision: str = option("auto", "auto: bf16 on GPUs of compute capability 8 or more, fp16 below, bf16 on a "
                            "CPU with native bf16, else fp32. bf16/fp16: mixed precision (fp32 weights and "
                            "optimizer state, autocast compute; fp16 with dynamic loss scaling, GPU only). "
                            "pure-bf16: bf16 weights (smaller, faster; updates below half a bf16 step are lost "
                            "at small learning rates)", "|".join(PRECISIONS))
    export_fp32: bool = option(False, "write RUN/final (and `dialogtrain export`) in fp32 instead of the run's "
                               "precision (bf16/fp16 runs export 16-bit weights by default)")
    optimizer: str = option("adamw", "adamw: torch's AdamW, fused on a GPU (DeepSpeed's CPU Adam with --offload); "
                            "fused-adam: DeepSpeed's FusedAdam, built on the first run (needs the CUDA toolkit)",
                            "|".join(OPTIMIZERS))
    zero: int = option(0, "ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, "
                       "3 also weights", "0|1|2|3")
    offload: str = option("none", "move optimizer state (ZeRO 1-3) and weights (ZeRO-3) to CPU RAM",
                          "|".join(OFFLOADS))
    gradient_checkpointing: bool = option(False, "recompute each layer's activations in the backward pass "
                                          "instead of keeping them: activation memory of about one layer, "
                                          "about a third more compute")

    @property
    def compute_dtype(self) -> str:
        """The torch dtype name the forward computes in (a resolved --precision)."""
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "pure-bf16": "bfloat16"}[self.precision]

    @property
    def export_dtype(self) -> str:
        """The torch dtype name of the exported weights: the run's precision, or fp32 on request."""
        return "float32" if self.export_fp32 else self.compute_dtype

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
        if self.optimizer not in OPTIMIZERS:
            out.append(f"{flag('optimizer')} must be one of {'|'.join(OPTIMIZERS)}, got {self.optimizer!r}")
        elif self.optimizer == "fused-adam" and self.offload != "none":
            out.append(f"{flag('optimizer')} fused-adam runs on the GPU; with {flag('offload')} {self.offload} the "
                       f"optimizer runs on the CPU (DeepSpeed's CPU Adam): use {flag('optimizer')} adamw")
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
    eval_on_start: bool = option(False, "also evaluate before the first step: the base model's held-out figures, "
                                 "logged as step 0 (not when resuming)")
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
    beta: float = option(0.1, "beta: how strongly the policy is held near the reference (DPO, IPO, hinge, KTO); "
                         "SimPO: the scale of its rewards (beta x mean token log-prob)")
    loss: str = option("sigmoid", "preference loss (train/losses.py: PREFERENCE_LOSSES); orpo and simpo need no "
                       "reference model", "|".join(preference_loss_names(paired=True)))
    label_smoothing: float = option(0.0, "conservative DPO: assumed probability that a preference is flipped")
    rpo_alpha: float = option(0.0, "weight of the chosen responses' NLL added to the DPO loss (RPO); 0 disables")
    precompute_ref: bool = option(False, "compute reference log-probs once before training instead of keeping "
                                  "the reference model")
    orpo_lambda: float = option(0.1, "ORPO: weight lambda of the odds-ratio term added to the chosen responses' NLL")
    simpo_gamma: float = option(0.5, "SimPO: target margin gamma between the chosen and rejected rewards")
    kto_desirable_weight: float = option(1.0, "KTO: weight of the losses of desirable (thumbs-up) completions")
    kto_undesirable_weight: float = option(1.0, "KTO: weight of the losses of undesirable (thumbs-down) completions; "
                                           "keep desirable weight x count / (undesirable weight x count) within "
                                           "[1, 4/3] (the start-up says which weights do)")

    def problems(self) -> list[str]:
        out = []
        if not self.beta > 0:
            out.append(f"{flag('beta')} must be > 0, got {self.beta}")
        if self.loss not in preference_loss_names():
            out.append(f"{flag('loss')} must be one of {'|'.join(preference_loss_names(paired=True))}, "
                       f"got {self.loss!r}")
        if not 0 <= self.label_smoothing < 0.5:
            out.append(f"{flag('label_smoothing')} must be in [0, 0.5), got {self.label_smoothing}")
        for name in ("rpo_alpha", "simpo_gamma"):
            if getattr(self, name) < 0:
                out.append(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("orpo_lambda", "kto_desirable_weight", "kto_undesirable_weight"):
            if not getattr(self, name) > 0:
                out.append(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        return out + self.unread_options()

    def unread_options(self) -> list[str]:
        """Options given (not at their default) that the chosen --loss does not read (options_of_loss)."""
        losses = preference_losses()
        if self.loss not in losses:
            return []
        reads, out = options_of_loss(losses[self.loss]), []
        for f in fields(self):
            if f.name in reads or getattr(self, f.name) == f.default:
                continue
            if f.name == "ref_model" and not losses[self.loss].reference:
                out.append(f"{flag('ref_model')}: {flag('loss')} {self.loss} uses no reference model")
            elif f.name == "precompute_ref" and losses[self.loss].reference:
                out.append(f"{flag('precompute_ref')}: {flag('loss')} {self.loss} scores new mismatched pairs with "
                           f"the reference every step (its KL estimate), so the reference stays live")
            elif f.name == "precompute_ref":
                out.append(f"{flag('precompute_ref')}: {flag('loss')} {self.loss} uses no reference model")
            else:
                readers = "|".join(name for name, loss in losses.items() if f.name in options_of_loss(loss))
                out.append(f"{flag(f.name)} {getattr(self, f.name)} applies to {flag('loss')} {readers} only, "
                           f"not {flag('loss')} {self.loss}")
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
    dist_timeout: float = option(30.0, "minutes a process waits for the others in a collective before the run "
                                 "fails (rank 0 alone exports the model or converts a checkpoint meanwhile)")

    def problems(self) -> list[str]:
        out = [] if self.output else [f"{flag('output')} is required"]
        if self.nproc < 1:
            out.append(f"{flag('nproc')} must be >= 1, got {self.nproc}")
        if self.max_restarts < 0:
            out.append(f"{flag('max_restarts')} must be >= 0, got {self.max_restarts}")
        if not self.dist_timeout > 0:
            out.append(f"{flag('dist_timeout')} must be > 0 minutes, got {self.dist_timeout}")
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


@dataclass(frozen=True)
class TrackOptions:
    report_to: str = option("none", "experiment trackers that also get every metrics.jsonl record (rank 0, offline "
                            "by default): none or a comma list; each is an extra: pip install "
                            "'dialogtrain[tensorboard]' (README: Experiment trackers)", "|".join(("none", *TRACKERS)))
    run_name: str | None = option(None, "the run's name in the trackers  [default: the --output folder's name]",
                                  "NAME")

    def problems(self) -> list[str]:
        out = []
        unknown = [name for name in requested_trackers(self.report_to) if name not in TRACKERS]
        if unknown:
            out.append(f"{flag('report_to')} {self.report_to}: give none or a comma list of {', '.join(TRACKERS)} "
                       f"({', '.join(unknown)} is not one)")
        if self.run_name is not None and not self.run_name.strip():
            out.append(f"{flag('run_name')} must not be empty")
        return out


SECTIONS = {
    "model": ModelOptions,
    "data": DataOptions,
    "optim": OptimOptions,
    "schedule": ScheduleOptions,
    "dpo": DPOOptions,
    "lora": LoraOptions,
    "track": TrackOptions,
    "launch": LaunchOptions,
}


@dataclass(frozen=True)
class RunOptions:
    """Everything a worker needs; `world_size` is the number of processes the launcher starts."""

    command: str = "sft"  # "sft" | "dpo" | "kto"
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    dpo: DPOOptions = field(default_factory=DPOOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    track: TrackOptions = field(default_factory=TrackOptions)
    launch: LaunchOptions = field(default_factory=LaunchOptions)
    world_size: int = 1

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: micro-batch x grad-accum x world size."""
        return self.optim.micro_batch * self.optim.grad_accum * self.world_size

    def problems(self) -> list[str]:
        out = []
        for name in SECTIONS:
            if name == "dpo" and self.command not in PREFERENCE_COMMANDS:
                continue
            out.extend(getattr(self, name).problems())
        out.extend(self.lora.problems_with(self.optim))
        out.extend(self.preference_problems())
        if self.schedule.eval_on_start and not (self.data.eval_data or self.data.eval_split):
            out.append(f"{flag('eval_on_start')} needs an eval set: {flag('eval_data')} or {flag('eval_split')}")
        if self.world_size < 1:
            out.append(f"world size must be >= 1, got {self.world_size}")
        return out

    def preference_problems(self) -> list[str]:
        """dpo trains pairs and kto rated completions; KTO's KL estimate needs two examples per step."""
        loss = preference_losses().get(self.dpo.loss)
        if self.command not in PREFERENCE_COMMANDS or loss is None:
            return []
        if loss.paired != PREFERENCE_COMMANDS[self.command]:
            other = next(c for c, paired in PREFERENCE_COMMANDS.items() if paired == loss.paired)
            what = "chosen/rejected pairs" if loss.paired else "completions rated good or bad"
            return [f"{flag('loss')} {self.dpo.loss} learns from {what}: run `dialogtrain {other}`"]
        if not loss.paired and self.global_batch < 2:
            return [f"`dialogtrain {self.command}` needs a global batch (--micro-batch x --grad-accum x processes) "
                    f"of at least 2: its KL estimate pairs each prompt with another example's completion"]
        return []

    @classmethod
    def from_flat(cls, command: str, values: dict[str, Any], world_size: int = 1) -> RunOptions:
        """Build from flag-named values (`micro_batch=4`); unknown keys and bad values are one OptionsError."""
        values = {**COMMAND_DEFAULTS.get(command, {}), **values}
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
                    problem = type_problem(f, grouped[section][f.name])
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
                   **{section: klass(**raw.get(section, {})) for section, klass in SECTIONS.items()})
