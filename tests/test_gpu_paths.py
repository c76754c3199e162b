"""The GPU paths' decisions, tested on the CPU with the device mocked: the precision `auto` picks, bf16
refused where a GPU only emulates it, the launch environment of GPU runs, the process-group timeout,
TF32, and ZeRO-3 loading partitioned. `make gpu-check` (tests/test_gpu.py) runs them for real."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from dialogtrain import hardware
from launcher.cli import cli
from launcher.devices import FAKE_CAPABILITY_ENV, FAKE_GPUS_ENV, Devices
from launcher.launch import launch_environment


def dry_run(*flags: str, gpus: int = 1, capability: str = "8.0"):
    return CliRunner().invoke(cli, ["sft", "--model", "m", "--data", "d.csv", "--output", "/tmp/dialogtrain-dry-run",
                                    *flags, "--dry-run"],
                              env={FAKE_GPUS_ENV: str(gpus), FAKE_CAPABILITY_ENV: capability})


@pytest.mark.parametrize("capability, precision", [("9.0", "bf16"), ("8.0", "bf16"), ("7.5", "fp16"), ("7.0", "fp16")])
def test_precision_auto_follows_the_compute_capability(capability, precision):
    result = dry_run("--gpus", "0", capability=capability)
    assert result.exit_code == 0, result.output
    assert f'"precision": "{precision}"' in result.output
    assert f"note: --precision auto: {precision} (GPU compute capability {capability} has" in result.output
    dtype = {"bf16": "bfloat16", "fp16": "float16"}[precision]
    assert f'"dtype": "{dtype}"' in result.output  # torch_autocast: mixed precision


def test_precision_auto_on_the_cpu_follows_its_bf16_instructions(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda flags=None: True)
    assert hardware.auto_precision("cpu", None)[0] == "bf16"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda flags=None: False)
    assert hardware.auto_precision("cpu", None) == (
        "fp32", "this CPU has no native bf16 (no AMX or AVX512-BF16), where bf16 is emulated and slow")
    assert hardware.auto_precision("cuda", None)[0] == "bf16"  # hosts that cannot be asked: assumed modern


@pytest.mark.parametrize("precision", ["bf16", "pure-bf16"])
def test_bf16_is_refused_on_a_gpu_that_emulates_it(precision):
    result = dry_run("--gpus", "0", "--precision", precision, capability="7.0")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"--precision {precision} needs GPUs of compute capability 8.0 or more (A100, H100, RTX 30xx/40xx); "
            "one here is 7.0, which emulates bf16 slowly: use --precision fp16 (or auto)") in result.output
    assert dry_run("--gpus", "0", "--precision", "fp16", capability="7.0").exit_code == 0


def test_pure_bf16_at_a_small_learning_rate_gets_a_warning():
    result = dry_run("--gpus", "0", "--precision", "pure-bf16", "--lr", "5e-6")
    assert result.exit_code == 0, result.output
    assert "note: --precision pure-bf16 with --lr 5e-06: a weight of 0.05 moves only once" in result.output
    assert "pure-bf16" not in dry_run("--gpus", "0", "--precision", "pure-bf16", "--lr", "2e-4").output.split(
        "# ")[0]  # no note at a learning rate whose updates land


def test_gpu_launches_number_gpus_as_nvidia_smi_and_give_cpu_adam_its_cores():
    gpus = Devices("cuda", [0, 1], 2, cuda_visible_devices="0,1")
    env = launch_environment(gpus, {}, cpu_count=16)
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert "OMP_NUM_THREADS" not in env  # torchrun's one thread is right when the GPU does the update
    offloaded = launch_environment(gpus, {}, cpu_count=16, offload=True)
    assert offloaded["OMP_NUM_THREADS"] == "8"  # DeepSpeed's CPU Adam gets the node's cores, split
    yours = launch_environment(gpus, {"OMP_NUM_THREADS": "3", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, cpu_count=16,
                               offload=True)
    assert (yours["OMP_NUM_THREADS"], yours["CUDA_DEVICE_ORDER"]) == ("3", "FASTEST_FIRST")  # yours win


def test_the_process_group_waits_dist_timeout_minutes(monkeypatch):
    """Every path that makes the process group gets --dist-timeout (the default 30 minutes, as the HF
    Trainer): a first start and a torchrun restart."""
    import datetime

    import deepspeed

    from dialogtrain.train import distributed

    seen = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: seen.update(init=kwargs["timeout"]))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda *args, **kwargs: seen.update(group=kwargs["timeout"]))
    monkeypatch.setattr(distributed, "restart_store", lambda rank, size, restart, timeout: seen.update(store=timeout))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with distributed.distributed_world(45.0):
        pass
    assert seen == {"init": datetime.timedelta(minutes=45), "group": datetime.timedelta(minutes=45),
                    "store": datetime.timedelta(minutes=45)}
    from dialogtrain.options import RunOptions

    assert RunOptions().launch.dist_timeout == 30.0


def test_fp32_matmuls_use_tensor_cores_on_a_gpu():
    from dialogtrain.train.distributed import use_tensor_cores_for_fp32

    before = torch.get_float32_matmul_precision()
    try:
        use_tensor_cores_for_fp32()
        assert torch.get_float32_matmul_precision() == "high"  # TF32 on Ampere and later
    finally:
        torch.set_float32_matmul_precision(before)


def test_zero3_loads_the_model_partitioned(llama_dir):
    """Under ZeRO-3 the weights are partitioned as they load (DeepSpeed's zero.Init): no rank holds the whole
    model first; the full sizes stay known (ds_numel)."""
    from dialogtrain.options import RunOptions
    from dialogtrain.train.distributed import distributed_world
    from dialogtrain.train.model import load_model, load_tokenizer
    from launcher.ds_config import build_ds_config, load_template
    from tests.sft_harness import single_process_env

    options = RunOptions.from_flat("sft", {"model": str(llama_dir), "data": "d", "output": "o", "zero": 3,
                                           "precision": "fp32"})
    ds_config = build_ds_config(options, load_template(options), device="cpu")
    tokenizer = load_tokenizer(str(llama_dir))
    with single_process_env(), distributed_world():
        partitioned = load_model(str(llama_dir), tokenizer, ds_config=ds_config)
        whole = load_model(str(llama_dir), tokenizer)
    assert all(hasattr(p, "ds_numel") for p in partitioned.parameters())
    assert sum(p.ds_numel for p in partitioned.parameters()) == sum(p.numel() for p in whole.parameters())
    assert not any(hasattr(p, "ds_numel") for p in whole.parameters())
