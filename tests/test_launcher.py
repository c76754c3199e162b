"""The `dialogtrain` launcher: refused combinations, device choice, --config merging, --dry-run, the run
folder and the exit code, and that it starts instantly (no torch import). No training runs here."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from dialogtrain.errors import UserError
from dialogtrain.hardware import auto_precision
from dialogtrain.options import SECTIONS, RunOptions
from launcher.cli import cli
from launcher.devices import FAKE_GPUS_ENV, parse_gpu_ids, read_hostfile, resolve_devices, visible_gpus
from launcher.ds_config import build_ds_config, load_template
from launcher.flags import command_fields
from launcher.launch import deepspeed_env, write_deepspeed_env

REPO = Path(__file__).resolve().parent.parent
HEAVY_MODULES = ("torch", "deepspeed", "transformers", "datasets")


def invoke(*args: str, gpus: int = 0, env: dict | None = None):
    """`dialogtrain ARGS` in-process on a machine with `gpus` (fake) GPUs."""
    return CliRunner().invoke(cli, list(args), env={FAKE_GPUS_ENV: str(gpus), **(env or {})})


def sft_args(run_dir: Path, *more: str) -> list[str]:
    return ["sft", "--model", "m", "--data", "d.csv", "--output", str(run_dir), *more]


def assert_refused(result, *messages: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: invalid options:")
    for message in messages:
        assert message in result.output


# --- refused combinations ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,gpus,message", [
    (["--zero", "2", "--offload", "optimizer+param"], 0, "--offload optimizer+param needs --zero 3"),
    (["--zero", "0", "--offload", "optimizer"], 0, "--offload optimizer needs --zero 1, 2 or 3"),
    (["--precision", "fp16", "--gpus", "cpu"], 4, "--precision fp16 needs a GPU"),
    (["--precision", "fp16"], 0, "--precision fp16 needs a GPU"),
    (["--gpus", "a,b"], 4, "--gpus 'a,b': expected GPU ids like 0,1,3, or all, or cpu"),
    (["--gpus", "0,7"], 4, "--gpus 0,7: no GPU 7 (this machine shows 4: 0-3)"),
    (["--gpus", "0,1", "--nproc", "4"], 4, "--nproc 4 is for --gpus cpu"),
    (["--lrr", "1e-4"], 0, "unknown option --lrr (did you mean --lr?)"),
    (["--beta", "0.2"], 0, "--beta is a dpo option, `dialogtrain sft` does not take it"),
    (["--micro-batch", "many"], 0, "--micro-batch must be an integer, got 'many'"),
    (["--ds-config", "missing.json"], 0, "--ds-config missing.json: no such file"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_refused_combinations_name_their_flag(tmp_path, args, gpus, message):
    assert_refused(invoke(*sft_args(tmp_path / "run", *args, "--dry-run"), gpus=gpus), message)


def test_all_problems_are_reported_together(tmp_path):
    result = invoke("sft", "--data", "d.csv", "--output", str(tmp_path / "run"), "--zero", "1",
                    "--offload", "optimizer+param", "--precision", "fp16", "--gpus", "cpu", "--dry-run")
    assert_refused(result)
    assert result.output.splitlines()[1:] == [
        "  --model is required",
        "  --offload optimizer+param needs --zero 3 (DeepSpeed ignores parameter offload below ZeRO-3)",
        "  --precision fp16 needs a GPU (this run is on the CPU); use --precision bf16 or fp32 on CPU",
    ]


def test_missing_required_options_without_any_flag():
    assert_refused(invoke("sft"), "--model is required", "--data is required", "--output is required")


def test_dpo_takes_its_own_flags(tmp_path):
    result = invoke("dpo", "--model", "m", "--ref-model", "r", "--data", "p.jsonl",
                    "--output", str(tmp_path / "run"), "--beta", "0.5", "--loss", "ipo", "--gpus", "cpu",
                    "--dry-run")
    assert result.exit_code == 0, result.output
    assert '"beta": 0.5' in result.output and '"ref_model": "r"' in result.output
    assert "-m dialogtrain.dpo" in result.output
    bad_loss = invoke("dpo", "--model", "m", "--data", "p", "--output", "r", "--loss", "dpop", "--dry-run")
    assert_refused(bad_loss, "--loss must be one of sigmoid|ipo|hinge|orpo|simpo, got 'dpop'")
    unpaired = invoke("dpo", "--model", "m", "--data", "p", "--output", "r", "--loss", "kto", "--dry-run")
    assert_refused(unpaired, "--loss kto learns from completions rated good or bad: run `dialogtrain kto`")


# --- devices and the launch command -----------------------------------------------------------------

def test_dry_run_on_chosen_gpus(tmp_path):
    run_dir = tmp_path / "run"
    result = invoke(*sft_args(run_dir, "--gpus", "0,2", "--precision", "fp16", "--master-port", "29555",
                              "--dry-run"), gpus=4)
    assert result.exit_code == 0, result.output
    command = exec_line(dry_run_sections(result.stdout)["command.sh"])
    assert command == (f"CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0,2 PYTHONUNBUFFERED=1 exec {sys.executable} "
                       f"-m dialogtrain.torchrun "
                       f"--nnodes 1 --node-rank 0 --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29555 "
                       f"--max-restarts 0 -m dialogtrain.sft {run_dir.resolve() / 'run.json'}")
    assert "global batch 8 = micro-batch 4 x grad-accum 1 x 2 processes" in result.output
    assert not run_dir.exists()


def test_all_gpus_get_one_process_each(tmp_path):
    result = invoke(*sft_args(tmp_path / "run", "--gpus", "all", "--dry-run"), gpus=3)
    assert result.exit_code == 0, result.output
    assert "CUDA_VISIBLE_DEVICES=0,1,2 " in result.output and "--nproc-per-node 3 " in result.output
    assert '"world_size": 3' in result.output


def test_one_gpu_id_without_a_gpu_falls_back_to_the_cpu(tmp_path):
    result = invoke(*sft_args(tmp_path / "run", "--gpus", "0", "--dry-run"), gpus=0)
    assert result.exit_code == 0, result.output
    assert "note: --gpus 0: no GPU found (nvidia-smi lists none): running on the CPU" in result.output
    assert "CUDA_VISIBLE_DEVICES='' DS_ACCELERATOR=cpu " in result.output
    assert "--nproc-per-node 1 " in result.output


def test_gpu_ids_that_do_not_exist_are_one_clear_error(tmp_path):
    assert_refused(invoke(*sft_args(tmp_path / "run", "--gpus", "1,3", "--dry-run"), gpus=2),
                   "--gpus 1,3: no GPU 3 (this machine shows 2: 0-1)")


def test_cpu_processes_share_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    result = invoke(*sft_args(tmp_path / "run", "--gpus", "cpu", "--nproc", "2", "--dry-run"),
                    env={"OMP_NUM_THREADS": None})
    assert result.exit_code == 0, result.output
    assert "OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 exec " in result.output
    assert "--nproc-per-node 2 " in result.output
    assert '"world_size": 2' in result.output
    users_choice = invoke(*sft_args(tmp_path / "run", "--gpus", "cpu", "--nproc", "2", "--dry-run"),
                          env={"OMP_NUM_THREADS": "3"})
    assert "OMP_NUM_THREADS=3 " in users_choice.output


def test_several_gpu_ids_are_shown_on_a_machine_without_gpus_in_a_dry_run_only(tmp_path):
    """A login node without GPUs is where a launch is prepared: --dry-run prints the GPU command with a
    note and exits 0; the real launch there is refused."""
    run_dir = tmp_path / "run"
    result = invoke(*sft_args(run_dir, "--gpus", "0,2", "--master-port", "29555", "--dry-run"), gpus=0)
    assert result.exit_code == 0, result.output
    assert ("note: --gpus 0,2: no GPU here to check these ids against (nvidia-smi lists none); the command is "
            "shown as it runs on a machine that has them") in result.output
    command = exec_line(dry_run_sections(result.stdout)["command.sh"])
    assert command.startswith("CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0,2 PYTHONUNBUFFERED=1 exec ")
    assert "--nproc-per-node 2 " in command
    assert "global batch 8 = micro-batch 4 x grad-accum 1 x 2 processes" in result.output
    assert not run_dir.exists()
    refused = invoke(*sft_args(run_dir, "--gpus", "0,2"), gpus=0)
    assert_refused(refused, "--gpus 0,2: no GPU found (nvidia-smi lists none); use --gpus cpu --nproc 2")
    assert not run_dir.exists()


def test_resolve_devices_rules():
    four = ["0", "1", "2", "3"]
    assert resolve_devices("all", 1, four) == resolve_devices("0,1,2,3", 1, four)
    assert resolve_devices("all", 1, four).nproc == 4
    on_cpu = resolve_devices("all", 3, [])
    assert (on_cpu.kind, on_cpu.nproc, on_cpu.cuda_visible_devices) == ("cpu", 3, "")
    assert "no GPU found" in on_cpu.notice
    assert resolve_devices("cpu", 2, four) == resolve_devices("cpu", 2, [])
    assert resolve_devices("cpu", 2, four).notice is None
    # An existing CUDA_VISIBLE_DEVICES=5,7 renumbers: --gpus 1 is physical GPU 7.
    narrowed = resolve_devices("1", 1, ["5", "7"])
    assert (narrowed.ids, narrowed.cuda_visible_devices) == ([1], "7")
    with pytest.raises(UserError, match="--gpus '0,0': an id appears twice"):
        parse_gpu_ids("0,0")


def test_visible_gpus_honours_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr("launcher.devices.count_nvidia_smi_gpus", lambda: 8)
    assert visible_gpus({}) == [str(i) for i in range(8)]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "5,7"}) == ["5", "7"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({FAKE_GPUS_ENV: "2", "CUDA_VISIBLE_DEVICES": "5"}) == ["0", "1"]
    monkeypatch.setattr("launcher.devices.count_nvidia_smi_gpus", lambda: 0)
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == []


# --- several nodes: torchrun static rendezvous -----------------------------------------------------

def node_args(run_dir: Path, *more: str) -> list[str]:
    return sft_args(run_dir, "--gpus", "cpu", "--nproc", "2", "--nnodes", "2", "--master-addr", "10.1.2.3",
                    *more, "--dry-run")


def test_every_node_writes_the_same_run_folder(tmp_path):
    """run.json, ds_config.json and command.sh are the same bytes on every node (a shared --output is
    fine); command.sh takes the node rank from $NODE_RANK; the global batch counts every node."""
    run_dir = tmp_path / "run"
    nodes = [invoke(*node_args(run_dir, "--node-rank", str(rank)), env={"OMP_NUM_THREADS": "1"})
             for rank in (0, 1)]
    assert [node.exit_code for node in nodes] == [0, 0], nodes[0].output + nodes[1].output
    sections = [dry_run_sections(node.stdout) for node in nodes]
    assert sections[0] == sections[1]
    options = json.loads(sections[0]["run.json"])
    assert options["world_size"] == 4
    assert (options["launch"]["nnodes"], options["launch"]["master_addr"]) == (2, "10.1.2.3")
    assert json.loads(sections[0]["ds_config.json"])["train_batch_size"] == 4 * 1 * 4
    script = sections[0]["command.sh"].splitlines()
    cd_line = script.index(exec_line(sections[0]["command.sh"])) - 1
    assert script[cd_line:cd_line + 2] == [f"cd {Path.cwd()}", (
        f"CUDA_VISIBLE_DEVICES='' DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 exec {sys.executable} "
        f'-m dialogtrain.torchrun --nnodes 2 --node-rank "$NODE_RANK" --nproc-per-node 2 --master-addr 10.1.2.3 '
        f"--master-port 29500 --max-restarts 0 -m dialogtrain.sft {run_dir.resolve() / 'run.json'}")]
    assert ': "${NODE_RANK:?set NODE_RANK to the rank of this node, 0 to 1}"' in script
    assert "global batch 16 = micro-batch 4 x grad-accum 1 x 4 processes (2 nodes x 2)" in nodes[1].stdout


def test_the_command_script_refuses_to_run_without_a_node_rank(tmp_path):
    run_dir = tmp_path / "run"
    script = dry_run_sections(invoke(*node_args(run_dir, "--node-rank", "0")).stdout)["command.sh"]
    path = tmp_path / "command.sh"
    path.write_text(script.replace(" exec ", " exec echo "))  # the launch itself is not under test
    unset = subprocess.run(["bash", str(path)], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert unset.returncode != 0 and "set NODE_RANK to the rank of this node" in unset.stderr
    node1 = subprocess.run(["bash", str(path)], capture_output=True, text=True,
                           env={"PATH": os.environ["PATH"], "NODE_RANK": "1"})
    assert node1.returncode == 0 and "--nnodes 2 --node-rank 1 " in node1.stdout


@pytest.mark.parametrize("args,message", [
    (["--nnodes", "2", "--node-rank", "1"], "--nnodes 2 needs --master-addr: the address of node 0"),
    (["--nnodes", "2", "--master-addr", "h0"], "--nnodes 2 needs --node-rank: 0 on the node at --master-addr, "
                                               "1 on the other"),
    (["--nnodes", "3", "--master-addr", "h0", "--node-rank", "3"], "--node-rank 3 must be below --nnodes 3"),
    (["--nnodes", "0"], "--nnodes must be >= 1, got 0"),
], ids=["no master", "no node rank", "rank too high", "no nodes"])
def test_multi_node_refusals_name_the_flag(tmp_path, args, message):
    assert_refused(invoke(*sft_args(tmp_path / "run", "--gpus", "cpu", *args, "--dry-run")), message)


def test_the_master_port_is_the_users_or_a_fixed_one_with_several_nodes(tmp_path):
    chosen = invoke(*node_args(tmp_path / "run", "--node-rank", "0", "--master-port", "40001"))
    assert "--master-port 40001 " in chosen.stdout
    single = invoke(*sft_args(tmp_path / "run", "--gpus", "cpu", "--dry-run"))
    assert "--master-port 29500 " not in single.stdout  # one node: a free port


# --- several nodes: --hostfile through the deepspeed launcher -------------------------------------------

def write_hostfile(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_hostfile_dry_run_shows_the_deepspeed_command_and_the_worker_environment(tmp_path):
    hosts = write_hostfile(tmp_path / "hosts", "# two loopback hosts\n127.0.0.1 slots=1\n\nlocalhost slots=2\n")
    run_dir = tmp_path / "run"
    result = invoke(*sft_args(run_dir, "--gpus", "cpu", "--hostfile", str(hosts), "--master-addr", "127.0.0.1",
                              "--micro-batch", "2", "--dry-run"),
                    env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "secret"})
    assert result.exit_code == 0, result.output
    sections = dry_run_sections(result.stdout)
    assert json.loads(sections["run.json"])["world_size"] == 3
    assert exec_line(sections["command.sh"]) == (
        f"CUDA_VISIBLE_DEVICES='' DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 "
        f"DS_ENV_FILE={run_dir.resolve() / 'deepspeed_env'} exec {sys.executable} -m deepspeed.launcher.runner "
        f"--hostfile {hosts} --launcher pdsh --force_multi --master_port 29500 --master_addr 127.0.0.1 "
        f"--module --no_local_rank dialogtrain.sft {run_dir.resolve() / 'run.json'}")
    env_lines = sections["deepspeed_env"].splitlines()
    assert {"DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=1", "HF_HUB_OFFLINE=1"} <= set(env_lines)
    assert not any("CUDA_VISIBLE_DEVICES" in line or "HF_TOKEN" in line for line in env_lines)
    assert "global batch 6 = micro-batch 2 x grad-accum 1 x 3 processes (the slots of --hostfile)" in result.stdout


def test_deepspeed_env_carries_this_environment_and_keeps_the_users_files(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir(), cwd.mkdir()
    (home / ".deepspeed_env").write_text("# mine\nNCCL_SOCKET_IFNAME=eth0\n\nOMP_NUM_THREADS=8\n")
    text = deepspeed_env({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""},
                         {"PATH": "/a b/bin:/usr/bin", "DIALOGTRAIN_FAULT": "kill-at-step:2", "HOME": "/root"},
                         home, cwd)
    # Only KEY=VALUE lines (DeepSpeed splits every line at '='); the user's own file comes last and wins.
    assert text.splitlines() == ["DIALOGTRAIN_FAULT=kill-at-step:2", "PATH=/a b/bin:/usr/bin", "DS_ACCELERATOR=cpu",
                                 "OMP_NUM_THREADS=2", "NCCL_SOCKET_IFNAME=eth0", "OMP_NUM_THREADS=8"]
    named = deepspeed_env({}, {"DS_ENV_FILE": str(home / ".deepspeed_env")}, home, cwd)
    assert named.splitlines() == ["NCCL_SOCKET_IFNAME=eth0", "OMP_NUM_THREADS=8"]  # read once


def test_the_deepspeed_env_file_is_private(tmp_path):
    path = write_deepspeed_env(tmp_path, "A=1\n")
    assert path.read_text() == "A=1\n" and stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("text,message", [
    ("worker-1 slots=2\nworker-2\n", "line 2: expected 'host slots=K', got 'worker-2'"),
    ("worker-1 slots=0\n", "line 1: slots must be >= 1, got 0"),
    ("worker-1 slots=2\nworker-1 slots=4\n", "line 2: host worker-1 is already on line 1"),
    ("# nothing\n\n", "no hosts (expected lines like 'worker-1 slots=8')"),
    ("worker-1 slots=2 # the big one\nworker-2 slots=x\n", "line 2: expected 'host slots=K', got 'worker-2 slots=x'"),
], ids=["no slots", "zero slots", "twice", "empty", "bad number"])
def test_hostfile_lines_are_validated(tmp_path, text, message):
    hosts = write_hostfile(tmp_path / "hosts", text)
    assert_refused(invoke(*sft_args(tmp_path / "run", "--hostfile", str(hosts), "--dry-run")),
                   f"--hostfile {hosts} {message}" if message.startswith("line") else f"--hostfile {hosts}: {message}")


def test_read_hostfile_keeps_the_order_and_the_slots(tmp_path):
    hosts = write_hostfile(tmp_path / "hosts", "b slots=4\na slots=8   # comment\n")
    assert read_hostfile(str(hosts)) == ([("b", 4), ("a", 8)], [])
    assert read_hostfile(str(tmp_path / "missing")) == ([], [f"--hostfile {tmp_path / 'missing'}: no such file"])


@pytest.mark.parametrize("args,message", [
    (["--gpus", "0,1"], "--gpus 0,1 with --hostfile: the slots of each host pick its GPUs"),
    (["--gpus", "cpu", "--nproc", "2"], "--nproc 2 with --hostfile: slots=K in the hostfile sets the processes"),
    (["--gpus", "cpu", "--nnodes", "2", "--master-addr", "h0", "--node-rank", "0"],
     "--nnodes 2 and --hostfile: the hostfile lists the nodes; give one of them"),
    (["--gpus", "cpu", "--node-rank", "1"], "--node-rank with --hostfile: the deepspeed launcher numbers the hosts"),
    (["--gpus", "cpu", "--max-restarts", "2"], "--max-restarts needs torchrun; the deepspeed launcher"),
    (["--gpus", "cpu", "--precision", "fp16"], "--precision fp16 needs a GPU"),
], ids=["gpu ids", "nproc", "nnodes", "node rank", "restarts", "fp16 on cpu"])
def test_hostfile_refusals_name_the_flag(tmp_path, args, message):
    hosts = write_hostfile(tmp_path / "hosts", "h1 slots=2\nh2 slots=2\n")
    assert_refused(invoke(*sft_args(tmp_path / "run", "--hostfile", str(hosts), *args, "--dry-run")), message)


def test_hostfile_with_gpus_leaves_the_devices_to_each_host(tmp_path):
    hosts = write_hostfile(tmp_path / "hosts", "h1 slots=8\nh2 slots=8\n")
    result = invoke(*sft_args(tmp_path / "run", "--hostfile", str(hosts), "--precision", "bf16", "--dry-run"),
                    gpus=0)  # the launching machine needs no GPU of its own
    assert result.exit_code == 0, result.output
    command = exec_line(dry_run_sections(result.stdout)["command.sh"])
    # each host's slots set its CUDA_VISIBLE_DEVICES
    assert command.startswith("CUDA_DEVICE_ORDER=PCI_BUS_ID PYTHONUNBUFFERED=1 DS_ENV_FILE=")
    assert f" exec {sys.executable} -m deepspeed.launcher.runner " in command
    assert '"world_size": 16' in result.stdout


# --- --config FILE ----------------------------------------------------------------------------------

def printed_ds_config(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_config_file_values_are_used_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("micro-batch: 8\ngrad_accum: 2\nlr: 5e-5\nzero: 2\ngpus: [0, 1]\n")
    ds_config = printed_ds_config(invoke("config", "--config", str(config), "--micro-batch", "2", gpus=2))
    assert ds_config["train_micro_batch_size_per_gpu"] == 2  # the flag beat the file's 8
    assert ds_config["gradient_accumulation_steps"] == 2
    assert ds_config["optimizer"]["params"]["lr"] == 5e-5  # YAML reads 5e-5 as a string
    assert ds_config["zero_optimization"]["stage"] == 2
    assert ds_config["train_batch_size"] == 2 * 2 * 2  # gpus [0, 1]: two processes


def test_config_file_may_be_json(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"precision": "bf16", "grad_clip": 0.25, "gpus": "cpu"}))
    ds_config = printed_ds_config(invoke("config", "--config", str(config)))
    assert ds_config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # bf16: mixed precision
    assert ds_config["gradient_clipping"] == 0.25


def test_unknown_config_keys_are_errors_naming_the_key(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("micro_bach: 8\nbeta: 0.1\n")
    assert_refused(invoke(*sft_args(tmp_path / "run", "--config", str(config), "--dry-run")),
                   f"--config {config}: unknown key 'micro_bach' (did you mean micro-batch?)",
                   f"--config {config}: unknown key 'beta': --beta is a dpo option")


# --- dry run, run folder, exit code -----------------------------------------------------------------

def dry_run_sections(output: str) -> dict[str, str]:
    """{'run.json': text, 'ds_config.json': text, 'command.sh': text} from the --dry-run output."""
    sections, name = {}, None
    for line in output.splitlines(keepends=True):
        if line.startswith("# /"):
            name = Path(line[2:].strip()).name
            sections[name] = ""
        elif name:
            sections[name] += line
    return sections


def exec_line(script: str) -> str:
    """The launch line of a command.sh."""
    return next(line for line in script.splitlines() if " exec " in line)


def test_dry_run_prints_what_would_be_written_and_writes_nothing(tmp_path):
    result = invoke(*sft_args(tmp_path / "run", "--gpus", "cpu", "--micro-batch", "2", "--grad-accum", "3",
                              "--dry-run"))
    assert result.exit_code == 0, result.output
    sections = dry_run_sections(result.stdout)
    assert list(sections) == ["run.json", "ds_config.json", "command.sh"]
    assert json.loads(sections["run.json"])["optim"]["grad_accum"] == 3
    assert json.loads(sections["ds_config.json"])["train_batch_size"] == 6
    assert sections["command.sh"].startswith("#!/usr/bin/env bash\n")
    assert "dry run: nothing written, nothing started" in result.stdout
    assert not (tmp_path / "run").exists()


@pytest.fixture
def fake_worker(monkeypatch):
    """The launch command replaced by a Python one-liner; returns a setter for its code."""
    def use(code: str) -> None:
        monkeypatch.setattr("launcher.launch.launch_argv", lambda *args, **kwargs: [sys.executable, "-c", code])

    return use


def test_run_folder_is_written_and_the_exit_code_is_the_workers(tmp_path, fake_worker):
    fake_worker("import sys; sys.exit(3)")
    run_dir = tmp_path / "run"
    result = invoke(*sft_args(run_dir, "--gpus", "cpu", "--micro-batch", "2", "--lr", "1e-4"))
    assert result.exit_code == 3, result.output
    options = RunOptions.load(run_dir / "run.json")
    flat = {"model": "m", "data": "d.csv", "output": str(run_dir), "gpus": "cpu", "micro_batch": 2,
            "lr": 1e-4, "precision": auto_precision("cpu", None)[0]}  # run.json holds auto resolved
    expected = RunOptions.from_flat("sft", flat, world_size=1)
    assert options == expected
    written = json.loads((run_dir / "ds_config.json").read_text())
    assert written == build_ds_config(expected, load_template(expected), device="cpu")
    script = run_dir / "command.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "global batch 2 = micro-batch 2 x grad-accum 1 x 1 process" in result.stdout


def test_the_worker_gets_the_launch_environment(tmp_path, fake_worker):
    fake_worker("import os, sys; env = os.environ; sys.exit(0 if env['PYTHONUNBUFFERED'] == '1' "
                "and env['CUDA_VISIBLE_DEVICES'] == '' and env['DS_ACCELERATOR'] == 'cpu' else 4)")
    assert invoke(*sft_args(tmp_path / "run", "--gpus", "cpu")).exit_code == 0


def test_a_folder_holding_a_run_is_refused_unless_overwrite(tmp_path, fake_worker):
    fake_worker("import sys; sys.exit(0)")
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    refusal = f"--output {run_dir} already holds a run (final); choose a new --output, or add --overwrite"
    assert_refused(invoke(*sft_args(run_dir, "--gpus", "cpu")), refusal)
    result = invoke(*sft_args(run_dir, "--gpus", "cpu", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert not (run_dir / "final").exists()
    assert (run_dir / "notes.txt").exists() and (run_dir / "run.json").exists()


# --- chat and import-gguf hand over -----------------------------------------------------------------

def fake_module(monkeypatch, name: str, **functions) -> None:
    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**functions))


def test_chat_passes_its_options_and_exits_with_the_code_of_run_chat(monkeypatch):
    calls = []
    def run_chat(checkpoint, **settings):
        calls.append((checkpoint, settings))
        return 5

    fake_module(monkeypatch, "dialogtrain.chat.session", run_chat=run_chat)
    result = invoke("chat", "runs/a/final", "--greedy", "--seed", "1", "--compare", "runs/b/final")
    assert result.exit_code == 5, result.output
    assert calls == [("runs/a/final", dict(max_new_tokens=256, temperature=0.7, top_p=0.9, top_k=50,
                                           repetition_penalty=1.0, greedy=True, seed=1, system=None,
                                           device="auto", dtype="auto", prompt=None, compare="runs/b/final",
                                           trust_remote_code=False, adapter=None, feedback=None))]


def test_a_user_error_is_one_line_and_exit_code_2(monkeypatch):
    def refuse(gguf_file, out):
        raise UserError(f"GGUF file not found: {gguf_file}")

    fake_module(monkeypatch, "dialogtrain.export.gguf", import_gguf=refuse)
    result = invoke("import-gguf", "missing.gguf", "out")
    assert result.exit_code == 2
    assert result.output == "error: GGUF file not found: missing.gguf\n"


def test_import_gguf_prints_the_folder(monkeypatch, tmp_path):
    fake_module(monkeypatch, "dialogtrain.export.gguf", import_gguf=lambda gguf_file, out: Path(out))
    result = invoke("import-gguf", "model.gguf", str(tmp_path / "hf"))
    assert result.exit_code == 0, result.output
    assert f"dialogtrain chat {tmp_path / 'hf'}" in result.output


# --- options stay in sync with options.py -----------------------------------------------------------

def test_every_option_field_is_a_flag_with_help():
    all_fields = {f.name for klass in SECTIONS.values() for f in dataclasses.fields(klass)}
    assert all(f.metadata["help"] for klass in SECTIONS.values() for f in dataclasses.fields(klass))
    kto_only = {"kto_desirable_weight", "kto_undesirable_weight"}
    assert {f.name for f in command_fields("dpo")} == all_fields - kto_only
    dpo_only = {f.name for f in dataclasses.fields(SECTIONS["dpo"])}
    assert {f.name for f in command_fields("kto")} == all_fields - dpo_only | {"ref_model", "beta"} | kto_only
    assert {f.name for f in command_fields("sft")} == all_fields - dpo_only
    sft_flags = {opt for param in cli.commands["sft"].params for opt in param.opts}
    assert {"--micro-batch", "--grad-accum", "--ds-config", "--config", "--dry-run"} <= sft_flags
    dpo_flags = {opt for param in cli.commands["dpo"].params for opt in param.opts}
    assert "--beta" not in sft_flags and {"--beta", "--ref-model"} <= dpo_flags


# --- real processes ---------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "dialogtrain"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "launcher.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, FAKE_GPUS_ENV: "0"})


def test_importing_the_launcher_imports_no_heavy_library():
    probe = ("import sys, launcher.cli; "
             f"heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=REPO, timeout=60)


def test_help_runs_as_a_console_script():
    result = run_cli("--help")
    assert result.returncode == 0 and "sft" in result.stdout and "chat" in result.stdout


def test_end_to_end_dry_run_and_refusal_in_a_real_process(tmp_path):
    result = run_cli(*sft_args(tmp_path / "run", "--gpus", "cpu", "--nproc", "2", "--precision", "bf16",
                               "--dry-run"))
    assert result.returncode == 0, result.stderr
    sections = dry_run_sections(result.stdout)
    assert json.loads(sections["run.json"])["world_size"] == 2
    assert "-m dialogtrain.sft" in sections["command.sh"]
    assert not (tmp_path / "run").exists()
    refused = run_cli(*sft_args(tmp_path / "run", "--gpus", "cpu", "--precision", "fp16", "--zero", "9"))
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: invalid options:") and "Traceback" not in refused.stderr
    assert len(refused.stderr.splitlines()) == 3  # the header and two problems


def test_overwrite_removes_the_earlier_runs_results_and_tracker_files_only(tmp_path):
    from launcher.run_dir import clear_previous_run

    for name in ("checkpoints/step-000002", "final", "tensorboard", "mlruns/0", "wandb"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("metrics.jsonl", "run.json", "trackers.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    removed = clear_previous_run(tmp_path)
    assert removed == ["checkpoints", "final", "metrics.jsonl", "run.json", "tensorboard", "mlruns", "wandb",
                       "trackers.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
