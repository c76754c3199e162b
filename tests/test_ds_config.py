"""build_ds_config: golden JSON for every template x precision x offload, DeepSpeed accepts each result,
a user's --ds-config keeps its own settings, and what cannot be reconciled is refused naming the flag.

Regenerate the goldens after an intended change with `UPDATE_GOLDEN=1 pytest tests/test_ds_config.py`
and review the diff.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from dialogtrain.errors import UserError
from dialogtrain.options import PRECISIONS, OptionsError, RunOptions
from dialogtrain.train.engine import resolve_auto_sizes
from launcher.ds_config import (
    OWNED_KEYS,
    TEMPLATES_DIR,
    build_ds_config,
    consistency_problems,
    load_template,
    overridden_settings,
    read_ds_config_file,
    template_name,
)

GOLDEN = Path(__file__).resolve().parent / "golden"
VALID_OFFLOADS = {0: ["none"], 1: ["none", "optimizer"], 2: ["none", "optimizer"],
                  3: ["none", "optimizer", "optimizer+param"]}
RESOLVED = [precision for precision in PRECISIONS if precision != "auto"]  # the launcher resolves auto first
COMBINATIONS = [(zero, offload, precision) for zero, offloads in VALID_OFFLOADS.items()
                for offload in offloads for precision in RESOLVED]


def run_options(world_size: int = 2, **flat) -> RunOptions:
    values = {"model": "m", "data": "d", "output": "run", "micro_batch": 4, "grad_accum": 2, "lr": 2e-5,
              "weight_decay": 0.01, "grad_clip": 0.5, "warmup_steps": 10, **flat}
    return RunOptions.from_flat("sft", values, world_size=world_size)


def gpu_config(options: RunOptions, template: dict) -> dict:
    """The config on GPUs, the devices the goldens describe (the CPU's differences: test_cpu_...)."""
    return build_ds_config(options, template, device="cuda")


def golden_name(zero: int, offload: str, precision: str) -> str:
    return f"zero{zero}-{offload.replace('+', '_')}-{precision}.json"


@pytest.mark.parametrize("zero,offload,precision", COMBINATIONS)
def test_config_equals_its_golden_file(zero, offload, precision):
    options = run_options(zero=zero, offload=offload, precision=precision)
    config = gpu_config(options, load_template(options))
    golden = GOLDEN / golden_name(zero, offload, precision)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(json.dumps(config, indent=2) + "\n")
    assert config == json.loads(golden.read_text())


def test_golden_folder_holds_exactly_the_valid_combinations():
    assert sorted(p.name for p in GOLDEN.glob("*.json")) == sorted(golden_name(*c) for c in COMBINATIONS)


@pytest.mark.parametrize("zero", [0, 3])
def test_a_cpu_run_steps_with_torchs_fused_adamw(gpt2_dir, tmp_path, zero):
    """What DeepSpeed builds from the config on the CPU: torch.optim.AdamW with fused=True (at ZeRO-3 over
    each rank's flat partition, where the unfused step allocates two temporaries of its size)."""
    import torch

    from tests.sft_harness import train_in_process, write_pairs_csv, write_run_dir

    engine = train_in_process(write_run_dir(tmp_path / "run", model=str(gpt2_dir), zero=zero, gpus="cpu",
                                            data=str(write_pairs_csv(tmp_path / "pairs.csv")), micro_batch=2,
                                            max_steps=1, precision="fp32"))
    adam = engine.basic_optimizer
    assert type(adam) is torch.optim.AdamW and adam.defaults["fused"] is True
    assert all(len(state) > 0 for state in adam.state.values())  # it stepped


def test_every_template_and_precision_is_accepted_by_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig  # world size 1 without a process group

    for zero, offload, precision in COMBINATIONS:
        options = run_options(world_size=1, zero=zero, offload=offload, precision=precision)
        parsed = DeepSpeedConfig(resolve_auto_sizes(gpu_config(options, load_template(options)), 576))
        combination = (zero, offload, precision)
        assert (parsed.train_batch_size, parsed.zero_optimization_stage) == (8, zero), combination


def test_auto_zero_sizes_follow_the_hidden_size_with_a_floor():
    zero3 = json.loads((TEMPLATES_DIR / "zero3.json").read_text())
    assert resolve_auto_sizes(zero3, 576)["zero_optimization"] == {
        "stage": 3, "contiguous_gradients": True, "reduce_bucket_size": 2**20,  # 576^2 = 331776 < the floor
        "stage3_prefetch_bucket_size": 2**20, "stage3_param_persistence_threshold": 100_000,
        "stage3_max_live_parameters": 10 * 2**20, "stage3_max_reuse_distance": 10 * 2**20,
        "stage3_gather_16bit_weights_on_model_save": True}
    big = resolve_auto_sizes(zero3, 4096)["zero_optimization"]
    assert (big["reduce_bucket_size"], big["stage3_prefetch_bucket_size"], big["stage3_max_live_parameters"],
            big["stage3_param_persistence_threshold"]) == (4096**2, int(0.9 * 4096**2), 10 * 4096**2, 100_000)
    zero2 = json.loads((TEMPLATES_DIR / "zero2.json").read_text())
    assert resolve_auto_sizes(zero2, 2048)["zero_optimization"]["allgather_bucket_size"] == 2048**2
    # no hidden size: DeepSpeed's own defaults; a number of the user's is kept as written
    assert "reduce_bucket_size" not in resolve_auto_sizes(zero3, None)["zero_optimization"]
    mine = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}}
    assert resolve_auto_sizes(mine, 4096) == mine
    assert zero3["zero_optimization"]["reduce_bucket_size"] == "auto"  # the input is not modified


def test_batch_keys_are_micro_batch_times_grad_accum_times_processes():
    config = gpu_config(run_options(world_size=3, micro_batch=5, grad_accum=7), {})
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (5, 7)
    assert config["train_batch_size"] == 105


def test_precision_sections():
    """bf16 and fp16 are mixed precision (fp32 weights, DeepSpeed's torch_autocast); pure-bf16 is DeepSpeed's
    bf16 mode (bf16 weights); fp32 neither."""
    fp16 = gpu_config(run_options(precision="fp16"), {})
    assert (fp16["fp16"], fp16["bf16"]) == ({"enabled": False}, {"enabled": False})
    assert fp16["torch_autocast"] == {"enabled": True, "dtype": "float16"}
    bf16 = gpu_config(run_options(precision="bf16"), {})
    assert (bf16["fp16"], bf16["bf16"]) == ({"enabled": False}, {"enabled": False})
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    pure = gpu_config(run_options(precision="pure-bf16"), {})
    assert (pure["bf16"], pure["torch_autocast"]) == ({"enabled": True}, {"enabled": False})
    fp32 = gpu_config(run_options(precision="fp32"), {})
    assert (fp32["fp16"], fp32["bf16"], fp32["torch_autocast"]) == ({"enabled": False},) * 3


def test_the_optimizer_needs_no_build_unless_asked():
    """torch's fused AdamW by default (GPU and CPU); DeepSpeed's CPU Adam with offload; FusedAdam on request."""
    params = gpu_config(run_options(), {})["optimizer"]["params"]
    assert (params["torch_adam"], params["fused"]) == (True, True)
    cpu = build_ds_config(run_options(), {}, device="cpu")["optimizer"]["params"]
    assert (cpu["torch_adam"], cpu["fused"]) == (True, True)  # unfused on the CPU: 2 weight-sized temporaries
    offloaded = gpu_config(run_options(zero=2, offload="optimizer"), load_template(run_options(zero=2,
                                                                                              offload="optimizer")))
    assert offloaded["optimizer"]["params"]["torch_adam"] is False and "fused" not in offloaded["optimizer"]["params"]
    assert offloaded["zero_optimization"]["offload_optimizer"]["pin_memory"] is True  # fast copies to the GPU
    on_cpu = build_ds_config(run_options(zero=2, offload="optimizer"), {}, device="cpu")
    assert on_cpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is False
    fused = gpu_config(run_options(optimizer="fused-adam"), {})["optimizer"]["params"]
    assert fused["torch_adam"] is False and "fused" not in fused
    with pytest.raises(OptionsError, match="--optimizer fused-adam runs on the GPU"):
        run_options(optimizer="fused-adam", zero=2, offload="optimizer")


def test_optimizer_clipping_and_no_scheduler_section():
    config = gpu_config(run_options(lr=3e-4, weight_decay=0.1, grad_clip=0.0), {})
    assert config["optimizer"] == {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8, "fused": True,
                                                               "lr": 3e-4, "torch_adam": True, "weight_decay": 0.1}}
    assert config["gradient_clipping"] == 0.0
    assert "scheduler" not in config  # the worker's warm-up/decay schedule applies


@pytest.mark.parametrize("zero,offload,sections", [
    (1, "optimizer", {"offload_optimizer"}),
    (2, "optimizer", {"offload_optimizer"}),
    (3, "none", set()),
    (3, "optimizer", {"offload_optimizer"}),
    (3, "optimizer+param", {"offload_optimizer", "offload_param"}),
])
def test_offload_sections_follow_the_offload_flag(zero, offload, sections):
    options = run_options(zero=zero, offload=offload)
    zero_config = gpu_config(options, load_template(options))["zero_optimization"]
    assert {key for key in zero_config if key.startswith("offload_")} == sections
    for name in sections:
        assert zero_config[name] == {"device": "cpu", "pin_memory": True}  # pinned on GPUs (CPU: test above)
    assert zero_config.get("stage3_gather_16bit_weights_on_model_save", False) is (zero == 3)


@pytest.mark.parametrize("zero,offload,name", [
    (0, "none", "zero0.json"), (1, "optimizer", "zero1.json"), (2, "none", "zero2.json"),
    (2, "optimizer", "zero2_offload.json"), (3, "optimizer", "zero3_offload.json"),
    (3, "optimizer+param", "zero3_offload.json"),
])
def test_template_is_chosen_by_zero_and_offload(zero, offload, name):
    assert template_name(zero, offload) == name
    assert (TEMPLATES_DIR / name).is_file()


def test_the_template_is_not_modified():
    options = run_options(zero=3, offload="optimizer")
    template = load_template(options)
    before = copy.deepcopy(template)
    gpu_config(options, template)
    assert template == before


def user_options(path: Path, **flat) -> RunOptions:
    return run_options(ds_config=str(path), **flat)


def test_a_user_config_keeps_its_settings_and_the_flags_own_their_keys(tmp_path):
    user = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": 2,
            "fp16": {"enabled": True, "initial_scale_power": 12},
            "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000,
                                  "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}},
            "optimizer": {"type": "Lamb", "params": {"lr": 0.1}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}},
            "activation_checkpointing": {"partition_activations": True}}
    options = user_options(tmp_path / "mine.json", zero=2, offload="optimizer", precision="fp16")
    config = gpu_config(options, user)
    assert config["train_batch_size"] == 16
    assert config["fp16"] == {"enabled": False, "initial_scale_power": 12}  # fp16 is autocast now
    assert config["torch_autocast"] == {"enabled": True, "dtype": "float16"}
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000, "offload_optimizer": {
        "device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}}
    assert config["optimizer"] == {"type": "Lamb", "params": {"lr": 2e-5, "weight_decay": 0.01}}
    assert config["scheduler"] == user["scheduler"]
    assert config["activation_checkpointing"] == user["activation_checkpointing"]
    assert overridden_settings(user, config) == [
        "train_batch_size 64 -> 16 (--micro-batch x --grad-accum x processes of all nodes)",
        "fp16.enabled true -> false (--precision)",
        "optimizer.params.lr 0.1 -> 2e-05 (--lr)",
    ]  # "auto" and equal values are not listed


def test_a_user_offload_that_the_offload_flag_does_not_ask_for_is_refused(tmp_path):
    user = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    with pytest.raises(OptionsError) as refused:
        gpu_config(user_options(tmp_path / "mine.json", zero=3, offload="optimizer"), user)
    assert refused.value.problems == [
        f"--offload optimizer, but --ds-config {tmp_path / 'mine.json'} sets zero_optimization.offload_param."
        "device 'cpu'; pass --offload optimizer+param --zero 3 or remove that section"]


def test_sections_that_are_not_objects_are_refused(tmp_path):
    user = {"fp16": True, "zero_optimization": {"stage": 1, "offload_optimizer": "cpu"}, "bfloat16": {}}
    with pytest.raises(OptionsError) as refused:
        gpu_config(user_options(tmp_path / "mine.json"), user)
    assert len(refused.value.problems) == 3
    source = f"--ds-config {tmp_path / 'mine.json'}"
    assert all(problem.startswith(source) for problem in refused.value.problems)


def test_consistency_check_catches_a_wrong_train_batch_size():
    config = gpu_config(run_options(world_size=2), {})
    assert consistency_problems(config, 2) == []
    assert consistency_problems({**config, "train_batch_size": 12}, 2) == [
        "train_batch_size 12 != --micro-batch 4 x --grad-accum 2 x 2 processes (all nodes)"]


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("{not json", "not valid JSON (line 1"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_unreadable_user_config_names_ds_config(tmp_path, content, message):
    path = tmp_path / "mine.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match="--ds-config") as refused:
        read_ds_config_file(str(path))
    assert message in str(refused.value)


def test_the_templates_readme_names_every_template_and_every_key_the_flags_own():
    readme = (TEMPLATES_DIR / "README.md").read_text()
    names = sorted(path.name for path in TEMPLATES_DIR.glob("*.json"))
    assert names == ["zero0.json", "zero1.json", "zero2.json", "zero2_offload.json", "zero3.json",
                     "zero3_offload.json"]
    assert [name for name in names if f"`{name}`" not in readme] == []
    assert [key for key in OWNED_KEYS if f"`{key}`" not in readme] == []
