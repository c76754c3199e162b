"""`dialogtrain`, the command line.

sft and dpo merge `--config FILE` with the flags, validate everything at once, write the run folder
(run.json, ds_config.json, command.sh) and start torchrun with one worker per device; `config`
prints the DeepSpeed config those options resolve to; chat, import-gguf and export hand over to the
dialogtrain package, imported only when they run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from dialogtrain import __version__
from dialogtrain.errors import UserError
from dialogtrain.hardware import BF16_CAPABILITY, SLOW_BF16_NOTE, auto_precision, cpu_has_native_bf16
from dialogtrain.options import LaunchOptions, LoraOptions, OptimOptions, OptionsError, RunOptions
from dialogtrain.train.trackers import missing_tracker_problems
from launcher.devices import Devices, gpu_capabilities, read_hostfile, resolve_devices, resolve_hosts
from launcher.ds_config import build_ds_config, load_template, overridden_settings, read_ds_config_file
from launcher.flags import (
    command_fields,
    given_values,
    read_config_file,
    run_options,
    unknown_argument_problems,
)
from launcher.inspect_command import inspect_command
from launcher.launch import (
    WORKER_ENV,
    Launch,
    batch_arithmetic,
    node_rank_problems,
    plan_launch,
    run_forwarding_signals,
    shell_command,
    write_deepspeed_env,
)
from launcher.run_dir import clear_previous_run, resume_problems, run_folder_problem, write_run_dir

# Unknown flags reach the command as ctx.args, so they are reported with every other problem.
COLLECT_UNKNOWN = {"ignore_unknown_options": True, "allow_extra_args": True}
CONFIG_PLACEHOLDERS = {"model": "<model>", "data": "<data>", "output": "<run>"}  # `config` needs none of them


class DialogtrainGroup(click.Group):
    """Every command's UserError becomes `error: <message>` on stderr and exit code 2, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(err.exit_code)


@click.group(cls=DialogtrainGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="dialogtrain")
def cli() -> None:
    """Fine-tune dialogue language models with SFT and DPO on DeepSpeed, then chat with them."""


def main() -> None:
    cli(prog_name="dialogtrain")


@dataclass(frozen=True)
class ResolvedRun:
    """A validated run: its options, devices, DeepSpeed config, and notes for the user."""

    options: RunOptions
    devices: Devices
    ds_config: dict
    notes: list[str]


def resolve_run(ctx: click.Context, command: str, config_path: str | None,
                extra_checks: Callable[[dict[str, Any]], list[str]] = lambda values: [],
                defaults: dict[str, Any] | None = None, dry_run: bool = False) -> ResolvedRun:
    """Merge `defaults` < `--config FILE` < the command line, validate it all, build the DeepSpeed config.

    `extra_checks(values)` adds problems of its own (the run folder). Raises OptionsError listing
    every problem found, each naming its flag. `dry_run`: GPU ids that cannot be checked here are shown.
    """
    known_flags = [opt for param in ctx.command.params for opt in param.opts + param.secondary_opts]
    problems = unknown_argument_problems(ctx.args, command, known_flags)
    file_values, file_problems = read_config_file(config_path, command) if config_path else ({}, [])
    cli_values, cli_problems = given_values(ctx, command_fields(command))
    values = {**(defaults or {}), **file_values, **cli_values}
    problems += file_problems + cli_problems
    devices, device_problems = devices_for(values, dry_run)
    nnodes = values.get("nnodes", LaunchOptions.nnodes)
    world_size = devices.world_size(nnodes if isinstance(nnodes, int) and nnodes >= 1 else 1) if devices else 1
    capabilities = gpu_capabilities(devices) if devices else None
    notes = [devices.notice] if devices and devices.notice else []
    if devices and values.get("precision", OptimOptions.precision) == "auto":
        values["precision"], why = auto_precision(devices.kind, capabilities)
        notes.append(f"--precision auto: {values['precision']} ({why})")
    try:
        options = RunOptions.from_flat(command, values, world_size=world_size)
    except OptionsError as err:
        options, problems = None, problems + err.problems
    problems += device_problems + precision_problems(values, devices, capabilities) + extra_checks(values)
    ds_config, template, template_problems = ds_config_for(options, values, devices)
    problems += template_problems
    if problems:
        raise OptionsError(list(dict.fromkeys(problems)))
    if devices.kind == "cpu" and "bf16" in options.optim.precision and not cpu_has_native_bf16():
        notes.append(SLOW_BF16_NOTE)
    if options.optim.precision == "pure-bf16" and options.optim.lr < PURE_BF16_MIN_LR:
        notes.append(pure_bf16_note(options.optim.lr))
    if options.launch.ds_config:
        notes += [f"--ds-config {options.launch.ds_config}: {line}"
                  for line in overridden_settings(template, ds_config)]
    return ResolvedRun(options, devices, ds_config, notes)


def devices_for(values: dict[str, Any], dry_run: bool = False) -> tuple[Devices | None, list[str]]:
    """Devices of this node, or of every host of --hostfile; (None, problems) when they cannot be had."""
    gpus, nproc = values.get("gpus", LaunchOptions.gpus), values.get("nproc", LaunchOptions.nproc)
    hostfile = values.get("hostfile")
    if not isinstance(gpus, str):
        return None, []  # from_flat names the bad type
    nproc = nproc if isinstance(nproc, int) and not isinstance(nproc, bool) and nproc >= 1 else 1
    try:
        if isinstance(hostfile, str) and hostfile:
            hosts, problems = read_hostfile(hostfile)
            return (resolve_hosts(gpus, nproc, hosts), []) if hosts and not problems else (None, problems)
        return resolve_devices(gpus, nproc, dry_run=dry_run), []
    except UserError as err:
        return None, [str(err)]


def precision_problems(values: dict[str, Any], devices: Devices | None,
                       capabilities: list[tuple[int, int]] | None) -> list[str]:
    """fp16 on the CPU, and bf16 on GPUs that only emulate it, are refused."""
    precision = values.get("precision")
    if devices and devices.kind == "cpu" and precision == "fp16":
        return ["--precision fp16 needs a GPU (this run is on the CPU); use --precision bf16 or fp32 on CPU"]
    if capabilities and isinstance(precision, str) and "bf16" in precision and min(capabilities) < BF16_CAPABILITY:
        major, minor = min(capabilities)
        return [f"--precision {precision} needs GPUs of compute capability 8.0 or more (A100, H100, RTX 30xx/40xx); "
                f"one here is {major}.{minor}, which emulates bf16 slowly: use --precision fp16 (or auto)"]
    return []


# Below this learning rate pure-bf16 loses most updates of typical weights (see pure_bf16_note).
PURE_BF16_MIN_LR = 1e-4


def pure_bf16_note(lr: float) -> str:
    return (f"--precision pure-bf16 with --lr {lr:g}: a weight of 0.05 moves only once its accumulated updates "
            "pass half a bf16 step (1.2e-4), so at this rate most updates never reach the forward pass (DPO then "
            "learns nothing); --precision bf16 keeps fp32 weights and every update")


def ds_config_for(options: RunOptions | None, values: dict[str, Any],
                  devices: Devices | None) -> tuple[dict | None, dict | None, list[str]]:
    """(ds_config, template, problems); without valid options only the --ds-config file is checked."""
    try:
        if options is None:
            if isinstance(values.get("ds_config"), str):
                read_ds_config_file(values["ds_config"])
            return None, None, []
        template = load_template(options)
        return build_ds_config(options, template, device=devices.kind if devices else "cuda"), template, []
    except OptionsError as err:
        return None, None, err.problems
    except UserError as err:
        return None, None, [str(err)]


def launcher_options(function: Callable) -> Callable:
    """Flags of the launch itself, not stored in run.json."""
    decorators = [
        click.option("--config", "config_path", metavar="FILE",
                     help="YAML or JSON file of options (keys are flag names); command-line flags win"),
        click.option("--dry-run", is_flag=True,
                     help="print run.json, ds_config.json and the launch command; "
                          "write nothing, start nothing"),
        click.option("--overwrite", is_flag=True,
                     help="replace an earlier run in --output (its checkpoints/, final/, metrics.jsonl)"),
        click.option("--node-rank", type=click.IntRange(min=0), metavar="R",
                     help="this node's rank with --nnodes: 0 on the --master-addr node, 1 to N-1 on the others"),
        click.option("--master-port", type=click.IntRange(1, 65535), metavar="PORT",
                     help="rendezvous port on the --master-addr node  [default: a free port on one node; "
                          "29500 with --nnodes or --hostfile, as every node must use the same]"),
    ]
    for decorate in reversed(decorators):
        function = decorate(function)
    return function


def training_command(command: str, summary: str) -> click.Command:
    """`dialogtrain sft` / `dialogtrain dpo`: the same launch, a different worker and option set."""

    @cli.command(command, help=summary, context_settings=COLLECT_UNKNOWN)
    @run_options(command)
    @launcher_options
    @click.pass_context
    def start(ctx: click.Context, config_path: str | None, dry_run: bool, overwrite: bool,
              node_rank: int | None, master_port: int | None, **_flags: Any) -> None:
        def run_folder_problems(values: dict[str, Any]) -> list[str]:
            output, resume = values.get("output"), values.get("resume")
            resume = resume if isinstance(resume, str) else None
            problem = run_folder_problem(output, overwrite, resume) if isinstance(output, str) and output else None
            nodes = node_rank_problems(node_rank, values.get("nnodes", LaunchOptions.nnodes), values.get("hostfile"))
            return ([problem] if problem else []) + nodes

        def launch_problems(values: dict[str, Any]) -> list[str]:  # and --report-to's packages, installed here
            return run_folder_problems(values) + missing_tracker_problems(values.get("report_to"))

        run = resolve_run(ctx, command, config_path, extra_checks=launch_problems, dry_run=dry_run)
        refused = resume_problems(run.options)  # before run.json is rewritten
        if refused:
            raise OptionsError(refused)
        ctx.exit(launch(command, run, dry_run=dry_run, overwrite=overwrite, node_rank=node_rank,
                        master_port=master_port))

    return start


def launch(command: str, run: ResolvedRun, *, dry_run: bool, overwrite: bool, node_rank: int | None = None,
           master_port: int | None = None) -> int:
    """Write the run folder and start the workers (or only show them, for --dry-run). Returns the exit code.

    With --nnodes every node does all of this alike: its run.json, ds_config.json and command.sh are the
    same bytes (a shared --output is fine), and no worker reads them before all nodes have joined.
    """
    run_dir = Path(run.options.launch.output).resolve()
    started = plan_launch(command, run.options, run.devices, run_dir, node_rank, master_port)
    for note in run.notes:
        click.echo(f"note: {note}", err=True)
    if dry_run:
        show_dry_run(run, run_dir, started)
        return 0
    if overwrite:
        removed = clear_previous_run(run_dir)
        if removed:
            click.echo(f"--overwrite: removed {', '.join(removed)} from {run_dir}")
    write_run_dir(run_dir, run.options, run.ds_config, started.script)
    if started.worker_env is not None:
        write_deepspeed_env(run_dir, started.worker_env)
    click.echo(f"run folder: {run_dir}")
    click.echo(batch_arithmetic(run.options))
    click.echo(f"$ {shell_command(started.argv, started.env)}")
    return run_forwarding_signals(started.argv, started.env)


def show_dry_run(run: ResolvedRun, run_dir: Path, started: Launch) -> None:
    click.echo(f"# {run_dir / 'run.json'}")
    click.echo(json.dumps(run.options.to_dict(), indent=2))
    click.echo(f"# {run_dir / 'ds_config.json'}")
    click.echo(json.dumps(run.ds_config, indent=2))
    click.echo(f"# {run_dir / 'command.sh'}")
    click.echo(started.script, nl=False)
    if started.worker_env is not None:
        click.echo(f"# {run_dir / WORKER_ENV}")
        click.echo(started.worker_env, nl=False)
    click.echo(batch_arithmetic(run.options))
    click.echo("dry run: nothing written, nothing started")


sft = training_command("sft", """Supervised fine-tuning on conversations: only assistant turns are learned.

\b
  dialogtrain sft --model microsoft/DialoGPT-medium --data support.csv --output runs/support \\
      --gpus 0,1 --precision fp16 --micro-batch 8 --epochs 3
""")

dpo = training_command("dpo", """Preference optimization on prompt/chosen/rejected pairs: DPO and its variants,
or ORPO and SimPO without a reference model (--loss).

\b
  dialogtrain dpo --model runs/support/final --data prefs.jsonl --output runs/support-dpo \\
      --beta 0.1 --loss sigmoid --gpus all --precision bf16
""")

kto = training_command("kto", """KTO on completions rated good or bad (prompt, completion, label: true|false), such as
the ratings `dialogtrain chat --feedback` writes; chosen/rejected pairs count as one of each.

\b
  dialogtrain kto --model runs/support/final --data runs/support/feedback.jsonl --output runs/support-kto \\
      --beta 0.1 --gpus all --precision bf16
""")


def ds_config_command(ctx: click.Context, config_path: str | None, **_flags: Any) -> None:
    """Print the DeepSpeed config `dialogtrain sft` would use with these options (--model, --data and
    --output are not needed)."""
    run = resolve_run(ctx, "sft", config_path, defaults=CONFIG_PLACEHOLDERS)
    for note in run.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(json.dumps(run.ds_config, indent=2))


def ds_config_printer(name: str, hidden: bool) -> click.Command:
    """`dialogtrain ds-config`, and `config`, its old name, kept as a hidden alias."""
    command = click.option("--config", "config_path", metavar="FILE",
                           help="YAML or JSON file of options; flags win")(click.pass_context(ds_config_command))
    return cli.command(name, context_settings=COLLECT_UNKNOWN, hidden=hidden)(run_options("sft")(command))


ds_config_printer("ds-config", hidden=False)
ds_config_printer("config", hidden=True)


@cli.command("plan")
@click.option("--model", required=True, metavar="MODEL", help="Hugging Face model id or local folder (only its "
              "config is read)")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="GPUs per node (a count, unlike the ids of `sft --gpus`)")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True, metavar="N", help="nodes")
@click.option("--gpu-memory", type=click.FloatRange(min=0, min_open=True), metavar="GiB",
              help="memory of one GPU  [default: the smallest GPU nvidia-smi lists here]")
@click.option("--cpu-memory", type=click.FloatRange(min=0, min_open=True), metavar="GiB",
              help="RAM of one node  [default: this machine's]")
@click.option("--trust-remote-code", is_flag=True, help="run Python code shipped with the model's config")
@click.option("--lora-r", type=click.IntRange(min=0), default=0, metavar="R",
              help="plan LoRA of rank R (sft/dpo --lora-r): the adapters train, the base is frozen  [default: 0, "
                   "full fine-tuning]")
@click.option("--lora-targets", default=LoraOptions.lora_targets, metavar="all-linear|NAME,...",
              help="the modules that get adapters (sft/dpo --lora-targets)  [default: all-linear]")
@click.option("--load-in-4bit", is_flag=True, help="plan QLoRA: the frozen base's linear layers in 4 bits")
def plan_command(model: str, gpus: int, nnodes: int, gpu_memory: float | None, cpu_memory: float | None,
                 trust_remote_code: bool, lora_r: int, lora_targets: str, load_in_4bit: bool) -> None:
    """Memory per GPU of every ZeRO stage and offload choice for MODEL on N GPUs x K nodes (DeepSpeed's
    estimators), and the fastest choice that fits; with --lora-r, for LoRA (or QLoRA) of MODEL."""
    from dialogtrain.plan import GiB, plan_report

    lora = LoraOptions(lora_r=lora_r, lora_targets=lora_targets, load_in_4bit=load_in_4bit)
    if lora.problems():
        raise OptionsError(lora.problems())
    click.echo(plan_report(model, gpus, nnodes, gpu_bytes=int(gpu_memory * GiB) if gpu_memory else None,
                           cpu_bytes=int(cpu_memory * GiB) if cpu_memory else None,
                           trust_remote_code=trust_remote_code, lora=lora))


@cli.command()
@click.argument("checkpoint")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="longest reply, in tokens")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.7, show_default=True,
              help="sampling temperature; lower is more predictable")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0), default=0.9, show_default=True,
              help="sample from the smallest set of tokens holding this much probability")
@click.option("--top-k", type=click.IntRange(min=0), default=50, show_default=True,
              help="sample from the k most likely tokens; 0 disables")
@click.option("--repetition-penalty", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
              show_default=True, help="above 1 discourages repeating earlier tokens")
@click.option("--greedy", is_flag=True,
              help="always take the most likely token (ignores the sampling options)")
@click.option("--seed", type=int, default=None, help="seed the sampling, for repeatable replies")
@click.option("--system", metavar="TEXT", default=None,
              help="system message at the start of the conversation")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="auto: bf16 where the GPU or CPU (AMX, AVX512-BF16) computes it, else fp32")
@click.option("--prompt", metavar="TEXT", default=None, help="answer this one message and exit")
@click.option("--compare", metavar="OTHER_CHECKPOINT", default=None,
              help="a second checkpoint answering every message beside the first")
@click.option("--trust-remote-code", is_flag=True,
              help="run Python code shipped with the model (off: such a model is refused)")
@click.option("--adapter", metavar="DIR", default=None,
              help="a PEFT (LoRA) adapter folder, e.g. a LoRA run's final/adapter, loaded on top of CHECKPOINT "
                   "(its base model) without merging")
@click.option("--feedback", metavar="FILE", default=None,
              help="append the ratings of /good, /bad (and /prefer with --compare) to FILE as rows `dialogtrain kto` "
                   "and `dpo` train on  [default: feedback.jsonl in CHECKPOINT's run folder]")
def chat(checkpoint: str, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
         repetition_penalty: float, greedy: bool, seed: int | None, system: str | None, device: str,
         dtype: str, prompt: str | None, compare: str | None, trust_remote_code: bool, adapter: str | None,
         feedback: str | None) -> None:
    """Chat with CHECKPOINT: a run folder (its final/), an exported Hugging Face folder, or a .gguf file.

    Interactive on a terminal (replies stream; /help lists the commands; /good and /bad rate a reply into
    --feedback; Ctrl-C stops a reply; exit, quit or Ctrl-D leave); one reply line per input line when piped;
    one answer with --prompt.
    Loads safetensors weights only.
    """
    from dialogtrain.chat.session import run_chat

    sys.exit(run_chat(checkpoint, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      top_k=top_k, repetition_penalty=repetition_penalty, greedy=greedy, seed=seed,
                      system=system, device=device, dtype=dtype, prompt=prompt, compare=compare,
                      trust_remote_code=trust_remote_code, adapter=adapter, feedback=feedback))


cli.add_command(inspect_command)


@cli.command("plot")
@click.argument("runs", metavar="RUN [RUN...]", nargs=-1, required=True)
@click.option("--output", "-o", metavar="FILE.png", default="metrics.png", show_default=True,
              help="where to write the PNG")
def plot_command(runs: tuple[str, ...], output: str) -> None:
    """Plot loss, held-out loss, DPO rewards and throughput of one or more runs (their metrics.jsonl) into
    one PNG, the runs overlaid."""
    from dialogtrain.plot import plot_runs

    click.echo(f"wrote {plot_runs(list(runs), output)}")


@cli.command("import-gguf")
@click.argument("gguf_file", metavar="FILE")
@click.argument("out", metavar="OUT")
def import_gguf_command(gguf_file: str, out: str) -> None:
    """Convert the GGUF model FILE into a Hugging Face folder OUT that sft, dpo and chat load."""
    from dialogtrain.export.gguf import import_gguf

    folder = import_gguf(gguf_file, out)
    click.echo(f"imported {gguf_file} into {folder}")
    click.echo(f"  fine-tune it: dialogtrain sft --model {folder} --data DATA --output RUN")
    click.echo(f"  chat with it: dialogtrain chat {folder}")


@cli.command("export")
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("--output", "output", required=True, metavar="HF_DIR", help="the Hugging Face folder to write")
@click.option("--trust-remote-code", is_flag=True, help="run Python code shipped with the model's config")
def export_command(checkpoint: str, output: str, trust_remote_code: bool) -> None:
    """Turn a saved checkpoint (RUN/checkpoints/TAG, any ZeRO stage; a run folder means its latest) into a
    Hugging Face folder, offline: what RUN/final would hold had training ended there."""
    from dialogtrain.export.checkpoint import export_checkpoint

    folder = export_checkpoint(checkpoint, output, trust_remote_code)
    click.echo(f"exported {checkpoint} to {folder}")
    click.echo(f"  chat with it: dialogtrain chat {folder}")


if __name__ == "__main__":
    main()
