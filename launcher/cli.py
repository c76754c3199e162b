"""`dialogtrain`, the command line.

sft and dpo merge `--config FILE` with the flags, validate everything at once, write the run folder
(run.json, ds_config.json, command.sh) and start torchrun with one worker per device; `config`
prints the DeepSpeed config those options resolve to; chat and import-gguf hand over to the
dialogtrain package, imported only when they run.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from dialogtrain import __version__
from dialogtrain.errors import UserError
from dialogtrain.hardware import SLOW_BF16_NOTE, cpu_has_native_bf16
from dialogtrain.options import LaunchOptions, OptionsError, RunOptions
from launcher.devices import Devices, resolve_devices
from launcher.ds_config import build_ds_config, load_template, overridden_settings, read_ds_config_file
from launcher.flags import (
    command_fields,
    given_values,
    read_config_file,
    run_options,
    unknown_argument_problems,
)
from launcher.launch import (
    batch_arithmetic,
    command_script,
    free_port,
    launch_argv,
    launch_environment,
    run_forwarding_signals,
)
from launcher.run_dir import clear_previous_run, run_folder_problem, write_run_dir

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
                defaults: dict[str, Any] | None = None) -> ResolvedRun:
    """Merge `defaults` < `--config FILE` < the command line, validate it all, build the DeepSpeed config.

    `extra_checks(values)` adds problems of its own (the run folder). Raises OptionsError listing
    every problem found, each naming its flag.
    """
    known_flags = [opt for param in ctx.command.params for opt in param.opts + param.secondary_opts]
    problems = unknown_argument_problems(ctx.args, command, known_flags)
    file_values, file_problems = read_config_file(config_path, command) if config_path else ({}, [])
    cli_values, cli_problems = given_values(ctx, command_fields(command))
    values = {**(defaults or {}), **file_values, **cli_values}
    problems += file_problems + cli_problems
    devices, device_problems = devices_for(values)
    try:
        options = RunOptions.from_flat(command, values, world_size=devices.nproc if devices else 1)
    except OptionsError as err:
        options, problems = None, problems + err.problems
    problems += device_problems + cpu_problems(values, devices) + extra_checks(values)
    ds_config, template, template_problems = ds_config_for(options, values)
    problems += template_problems
    if problems:
        raise OptionsError(list(dict.fromkeys(problems)))
    notes = [devices.notice] if devices.notice else []
    if devices.kind == "cpu" and options.optim.precision == "bf16" and not cpu_has_native_bf16():
        notes.append(SLOW_BF16_NOTE)
    if options.launch.ds_config:
        notes += [f"--ds-config {options.launch.ds_config}: {line}"
                  for line in overridden_settings(template, ds_config)]
    return ResolvedRun(options, devices, ds_config, notes)


def devices_for(values: dict[str, Any]) -> tuple[Devices | None, list[str]]:
    gpus, nproc = values.get("gpus", LaunchOptions.gpus), values.get("nproc", LaunchOptions.nproc)
    if not isinstance(gpus, str):
        return None, []  # from_flat names the bad type
    nproc = nproc if isinstance(nproc, int) and not isinstance(nproc, bool) and nproc >= 1 else 1
    try:
        return resolve_devices(gpus, nproc), []
    except UserError as err:
        return None, [str(err)]


def cpu_problems(values: dict[str, Any], devices: Devices | None) -> list[str]:
    if devices and devices.kind == "cpu" and values.get("precision") == "fp16":
        return ["--precision fp16 needs a GPU (this run is on the CPU); use --precision bf16 or fp32 on CPU"]
    return []


def ds_config_for(options: RunOptions | None,
                  values: dict[str, Any]) -> tuple[dict | None, dict | None, list[str]]:
    """(ds_config, template, problems); without valid options only the --ds-config file is checked."""
    try:
        if options is None:
            if isinstance(values.get("ds_config"), str):
                read_ds_config_file(values["ds_config"])
            return None, None, []
        template = load_template(options)
        return build_ds_config(options, template), template, []
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
        click.option("--master-port", type=click.IntRange(1, 65535), metavar="PORT",
                     help="torchrun rendezvous port  [default: a free port]"),
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
              master_port: int | None, **_flags: Any) -> None:
        def run_folder_problems(values: dict[str, Any]) -> list[str]:
            output = values.get("output")
            problem = run_folder_problem(output, overwrite) if isinstance(output, str) and output else None
            return [problem] if problem else []

        run = resolve_run(ctx, command, config_path, extra_checks=run_folder_problems)
        ctx.exit(launch(command, run, dry_run=dry_run, overwrite=overwrite, master_port=master_port))

    return start


def launch(command: str, run: ResolvedRun, *, dry_run: bool, overwrite: bool, master_port: int | None) -> int:
    """Write the run folder and run torchrun (or only show them, for --dry-run). Returns the exit code."""
    run_dir = Path(run.options.launch.output).resolve()
    argv = launch_argv(command, run_dir / "run.json", run.devices.nproc, master_port or free_port(),
                       run.options.launch.max_restarts)
    env = launch_environment(run.devices, os.environ)
    script = command_script(argv, env, Path.cwd(), command)
    for note in run.notes:
        click.echo(f"note: {note}", err=True)
    if dry_run:
        show_dry_run(run, run_dir, script)
        return 0
    if overwrite:
        removed = clear_previous_run(run_dir)
        if removed:
            click.echo(f"--overwrite: removed {', '.join(removed)} from {run_dir}")
    write_run_dir(run_dir, run.options, run.ds_config, script)
    click.echo(f"run folder: {run_dir}")
    click.echo(batch_arithmetic(run.options))
    click.echo(f"$ {script.splitlines()[-1]}")
    return run_forwarding_signals(argv, env)


def show_dry_run(run: ResolvedRun, run_dir: Path, script: str) -> None:
    click.echo(f"# {run_dir / 'run.json'}")
    click.echo(json.dumps(run.options.to_dict(), indent=2))
    click.echo(f"# {run_dir / 'ds_config.json'}")
    click.echo(json.dumps(run.ds_config, indent=2))
    click.echo(f"# {run_dir / 'command.sh'}")
    click.echo(script, nl=False)
    click.echo(batch_arithmetic(run.options))
    click.echo("dry run: nothing written, nothing started")


sft = training_command("sft", """Supervised fine-tuning on conversations: only assistant turns are learned.

\b
  dialogtrain sft --model microsoft/DialoGPT-medium --data support.csv --output runs/support \\
      --gpus 0,1 --precision fp16 --micro-batch 8 --epochs 3
""")

dpo = training_command("dpo", """Direct Preference Optimization on prompt/chosen/rejected pairs.

\b
  dialogtrain dpo --model runs/support/final --data prefs.jsonl --output runs/support-dpo \\
      --beta 0.1 --loss sigmoid --gpus all --precision bf16
""")


@cli.command("config", context_settings=COLLECT_UNKNOWN)
@run_options("sft")
@click.option("--config", "config_path", metavar="FILE", help="YAML or JSON file of options; flags win")
@click.pass_context
def config_command(ctx: click.Context, config_path: str | None, **_flags: Any) -> None:
    """Print the DeepSpeed config `dialogtrain sft` would use with these options (--model, --data and
    --output are not needed)."""
    run = resolve_run(ctx, "sft", config_path, defaults=CONFIG_PLACEHOLDERS)
    for note in run.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(json.dumps(run.ds_config, indent=2))


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
              show_default=True)
@click.option("--prompt", metavar="TEXT", default=None, help="answer this one message and exit")
@click.option("--compare", metavar="OTHER_CHECKPOINT", default=None,
              help="a second checkpoint answering every message beside the first")
@click.option("--trust-remote-code", is_flag=True, help="run Python code shipped with the model")
def chat(checkpoint: str, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
         repetition_penalty: float, greedy: bool, seed: int | None, system: str | None, device: str,
         dtype: str, prompt: str | None, compare: str | None, trust_remote_code: bool) -> None:
    """Chat with CHECKPOINT: a run folder (its final/), a Hugging Face folder or id, or a .gguf file.

    Interactive on a terminal; one reply line per input line when piped; one answer with --prompt.
    """
    from dialogtrain.chat import run_chat

    sys.exit(run_chat(checkpoint, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      top_k=top_k, repetition_penalty=repetition_penalty, greedy=greedy, seed=seed,
                      system=system, device=device, dtype=dtype, prompt=prompt, compare=compare,
                      trust_remote_code=trust_remote_code))


@cli.command("import-gguf")
@click.argument("gguf_file", metavar="FILE")
@click.argument("out", metavar="OUT")
def import_gguf_command(gguf_file: str, out: str) -> None:
    """Convert the GGUF model FILE into a Hugging Face folder OUT that sft, dpo and chat load."""
    from dialogtrain.gguf_import import import_gguf

    folder = import_gguf(gguf_file, out)
    click.echo(f"imported {gguf_file} into {folder}")
    click.echo(f"  fine-tune it: dialogtrain sft --model {folder} --data DATA --output RUN")
    click.echo(f"  chat with it: dialogtrain chat {folder}")


if __name__ == "__main__":
    main()
