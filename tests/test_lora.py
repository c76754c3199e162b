"""LoRA and QLoRA (--lora-r, --load-in-4bit): refused options, SFT, DPO (and KTO) on the tiny GPT-2 (tied
embeddings) and Llama, the merged export and its PEFT adapter, checkpoints, resume and `dialogtrain
export`, chat --adapter, the plan; QLoRA where bitsandbytes runs here; ZeRO-3 on two processes (slow).

Adapter counts are computed by hand from the layer shapes: a rank-r adapter on a layer of fan-in n and
fan-out m adds r (n + m) parameters (A is r x n, B is m x r); DoRA adds m magnitudes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dialogtrain.errors import UserError
from dialogtrain.options import LoraOptions, OptimOptions, RunOptions
from dialogtrain.train.metrics import read_metrics
from launcher.cli import cli
from tests.checkpoint_helpers import final_weights, metrics_after, rewind
from tests.sft_harness import train_in_process, write_pairs_csv, write_run_dir
from tests.test_dpo import QUESTIONS, write_preferences_jsonl

R = 4
IDS = torch.tensor([[5, 17, 42, 9, 77, 3, 120, 64]])  # any tokens of the tiny vocabularies


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def adapter_parameters(model_dir: Path, r: int = R, dora: bool = False, saved: tuple[str, ...] = ()) -> int:
    """By hand: r (n + m) per linear layer (GPT-2's Conv1D included), the LM head excepted, + m with DoRA,
    + the parameters of the modules trained in full."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    head = model.get_output_embeddings()
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            n, m = module.in_features, module.out_features
        elif isinstance(module, Conv1D):
            n, m = module.weight.shape  # Conv1D stores (fan-in, fan-out)
        else:
            if name.split(".")[-1] in saved:
                total += sum(p.numel() for p in module.parameters())
            continue
        total += r * (n + m) + (m if dora else 0)
    return total


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def base_name(peft_name: str) -> str:
    """base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight -> model.layers.0.self_attn.q_proj.weight;
    a module trained in full keeps its frozen original as lm_head.original_module.weight."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")


# ----------------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize("flags, message", [
    (["--use-dora"], "--use-dora needs --lora-r R > 0 (LoRA); without it all weights train"),
    (["--lora-targets", "q_proj"], "--lora-targets needs --lora-r R > 0 (LoRA)"),
    (["--load-in-4bit"], "--load-in-4bit needs --lora-r R > 0 (LoRA)"),
    (["--lora-r", "8", "--load-in-4bit", "--zero", "3"], "--load-in-4bit works with --zero 0, 1 or 2: ZeRO-3"),
    (["--lora-r", "8", "--lora-alpha", "0"], "--lora-alpha must be > 0, got 0.0"),
    (["--lora-r", "-2"], "--lora-r must be >= 0 (0: full fine-tuning), got -2"),
    (["--lora-r", "8", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
    (["--lora-r", "8", "--lora-targets", "q_proj;v_proj"], "--lora-targets 'q_proj;v_proj': expected NAME,NAME"),
])
def test_refused_combinations_exit_2_naming_the_flag(flags, message, tmp_path):
    for command in ("sft", "dpo"):
        result = CliRunner().invoke(cli, [command, "--model", "m", "--data", "d.csv", "--output", str(tmp_path / "run"),
                                          "--gpus", "cpu", "--precision", "fp32", *flags])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: invalid options:") and message in result.output
        assert not (tmp_path / "run").exists()


def test_alpha_defaults_to_twice_the_rank_and_lora_options_are_stored_in_run_json(tmp_path):
    options = RunOptions.from_flat("sft", {"model": "m", "data": "d", "output": "o", "lora_r": 8,
                                           "lora_targets": "q_proj, v_proj", "lora_modules_to_save": "lm_head"})
    assert options.lora.alpha == 16.0
    assert RunOptions.from_flat("sft", {"model": "m", "data": "d", "output": "o", "lora_r": 8,
                                        "lora_alpha": 4}).lora.alpha == 4.0
    options.save(tmp_path / "run.json")
    assert json.loads((tmp_path / "run.json").read_text())["lora"] == {
        "lora_r": 8, "lora_alpha": None, "lora_dropout": 0.0, "lora_targets": "q_proj, v_proj",
        "lora_modules_to_save": "lm_head", "use_dora": False, "load_in_4bit": False}
    assert RunOptions.load(tmp_path / "run.json") == options

    from dialogtrain.train.lora import lora_config

    config = lora_config(options.lora)
    assert (config.r, config.lora_alpha, set(config.target_modules), config.modules_to_save) == \
        (8, 16.0, {"q_proj", "v_proj"}, ["lm_head"])


# ----------------------------------------------------------------------------------------------------
# SFT: what trains, what is exported


@pytest.mark.parametrize("model, zero, extra", [
    ("gpt2", 0, {}),
    ("llama", 0, {}),
    ("llama", 0, {"use_dora": True, "lora_modules_to_save": "lm_head"}),
], ids=["gpt2", "llama", "llama-dora-lm_head"])
def test_lora_sft_trains_only_the_adapters_and_exports_the_trained_model(model, zero, extra, request, tmp_path,
                                                                         capfd):
    """The loss falls; the base weights are bit-identical after training while every adapter moved; the plan
    line counts the adapters; RUN/final (merged) gives the trained PEFT model's logits, and RUN/final/adapter
    loaded by PEFT onto the base gives them too (fp32, 1e-5)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dialogtrain.export.adapter import gather_adapted_state_dict

    base_dir = request.getfixturevalue(f"{model}_dir")
    run_dir = tmp_path / "run"
    engine = train_in_process(write_run_dir(
        run_dir, model=str(base_dir), data=str(write_pairs_csv(tmp_path / "pairs.csv")), micro_batch=4, max_steps=6,
        lr=2e-2, precision="fp32", gpus="cpu", lora_r=R, zero=zero, **extra))
    run_losses = losses(run_dir)
    assert len(run_losses) == 6 and run_losses[-1] < run_losses[0] - 0.05

    saved = ("lm_head",) if extra else ()
    expected = adapter_parameters(base_dir, dora=bool(extra), saved=saved)
    # of all the parameters of the adapted model: the base's (a tied weight once) and the trained ones
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dir).parameters()) + expected
    out = "".join(capfd.readouterr())
    assert f"training {expected:,} of {total:,} parameters ({100 * expected / total:.2f}%)" in out
    assert "packing: off" not in out

    trained = gather_adapted_state_dict(engine)
    base = load_file(str(base_dir / "model.safetensors"))
    frozen = {base_name(k): v for k, v in trained.items() if "lora_" not in k and "modules_to_save" not in k}
    assert set(base) <= set(frozen)
    assert all(torch.equal(frozen[name], base[name]) for name in base)  # bit-identical
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: every adapter trained

    want = logits(engine.module)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32)
    assert (logits(merged) - want).abs().max() < 1e-5
    assert (want - logits(AutoModelForCausalLM.from_pretrained(base_dir))).abs().max() > 1e-3  # it did change
    adapter = run_dir / "final" / "adapter"
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    assert all(t.numel() > 0 for t in load_file(str(adapter / "adapter_model.safetensors")).values())
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    assert (logits(with_adapter) - want).abs().max() < 1e-5
    assert "quantization_config" not in json.loads((run_dir / "final" / "config.json").read_text())


@pytest.fixture(scope="module")
def zero0_lora_run(llama_dir, tmp_path_factory) -> tuple[Path, dict]:
    """(run folder, flags) of 3 LoRA SFT steps of the tiny Llama at ZeRO-0, the others' yardstick."""
    root = tmp_path_factory.mktemp("lora-zero0")
    flags = dict(model=str(llama_dir), data=str(write_pairs_csv(root / "pairs.csv")), micro_batch=4, max_steps=3,
                 lr=1e-2, precision="fp32", gpus="cpu", lora_r=R)
    train_in_process(write_run_dir(root / "run", **flags))
    return root / "run", flags


@pytest.mark.parametrize("zero, offload", [(3, "none"), (2, "optimizer"), (3, "optimizer+param")])
def test_every_zero_stage_and_offload_exports_the_zero0_weights_and_a_whole_adapter(zero, offload, zero0_lora_run,
                                                                                      tmp_path):
    """The same steps at ZeRO 2-3, with the optimizer (and weights) offloaded to CPU RAM: the same losses,
    merged weights and adapter as ZeRO-0 (1e-5). ZeRO-3 keeps every weight as an empty placeholder (shape
    [0]) outside a gather, even on one process: the export gathers them, so the adapter is whole."""
    from safetensors.torch import load_file

    yardstick, flags = zero0_lora_run
    run_dir = tmp_path / "run"
    train_in_process(write_run_dir(run_dir, **{**flags, "zero": zero, "offload": offload}))
    assert losses(run_dir) == pytest.approx(losses(yardstick), abs=1e-5)
    want, got = final_weights(yardstick / "final"), final_weights(run_dir / "final")
    assert want.keys() == got.keys() and max((want[k] - got[k]).abs().max().item() for k in want) < 1e-5
    a, b = (load_file(str(d / "final" / "adapter" / "adapter_model.safetensors")) for d in (yardstick, run_dir))
    assert a.keys() == b.keys() and all(b[k].shape == a[k].shape and b[k].numel() > 0 for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_gradient_checkpointing_and_padding_train_lora_alike(llama_dir, tmp_path, capfd):
    """--gradient-checkpointing (recomputed activations) and --no-packing (padded rows) give the same losses
    as the default (packed, activations kept), with LoRA as without."""
    data = write_pairs_csv(tmp_path / "pairs.csv")
    runs = {}
    for name, extra in [("default", {}), ("recompute", {"gradient_checkpointing": True}), ("padded", {"packing": False})]:
        train_in_process(write_run_dir(tmp_path / name, model=str(llama_dir), data=str(data), micro_batch=4,
                                       max_steps=3, lr=2e-2, precision="fp32", gpus="cpu", lora_r=R, **extra))
        runs[name] = losses(tmp_path / name)
    assert runs["recompute"] == pytest.approx(runs["default"], abs=1e-6)
    assert runs["padded"] == pytest.approx(runs["default"], abs=1e-5)
    assert runs["default"][-1] < runs["default"][0]


# ----------------------------------------------------------------------------------------------------
# DPO: the reference is the model with its adapters off


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_lora_dpo_starts_at_ln2_against_the_base_without_a_second_model(model, request, tmp_path, monkeypatch):
    """No --ref-model: the reference is the policy with its adapters disabled (no reference engine is ever
    built), so the first loss is ln 2, and every step's loss equals a run whose --ref-model is a copy of the
    base (1e-5), and one with --precompute-ref."""
    import dialogtrain.train.reference as reference

    base_dir = request.getfixturevalue(f"{model}_dir")
    data = write_preferences_jsonl(tmp_path / "prefs.jsonl", QUESTIONS[:8])
    flags = dict(model=str(base_dir), data=str(data), micro_batch=2, grad_accum=2, max_steps=3, lr=2e-2,
                 precision="fp32", gpus="cpu", lora_r=R)

    def no_second_model(*args, **kwargs):
        raise AssertionError("a reference engine was built")

    with monkeypatch.context() as patched:
        patched.setattr(reference, "build_reference_engine", no_second_model)
        train_in_process(write_run_dir(tmp_path / "adapters-off", command="dpo", **flags), "dpo")
    train_in_process(write_run_dir(tmp_path / "ref-model", command="dpo", ref_model=str(base_dir), **flags), "dpo")
    train_in_process(write_run_dir(tmp_path / "precomputed", command="dpo", precompute_ref=True, **flags), "dpo")
    off = losses(tmp_path / "adapters-off")
    assert off[0] == pytest.approx(math.log(2), abs=1e-6)
    assert off[-1] < off[0]
    assert losses(tmp_path / "ref-model") == pytest.approx(off, abs=1e-5)
    assert losses(tmp_path / "precomputed") == pytest.approx(off, abs=1e-5)
    assert (tmp_path / "adapters-off" / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_kto_scores_against_the_base_with_the_adapters_off(llama_dir, tmp_path):
    """`dialogtrain kto` shares the reference set-up: adapters off gives the --ref-model copy's losses."""
    data = write_preferences_jsonl(tmp_path / "prefs.jsonl", QUESTIONS[:8])  # a pair: one rating of each kind
    flags = dict(model=str(llama_dir), data=str(data), micro_batch=4, max_steps=3, lr=2e-2, precision="fp32",
                 gpus="cpu", lora_r=R)
    train_in_process(write_run_dir(tmp_path / "adapters-off", command="kto", **flags), "kto")
    train_in_process(write_run_dir(tmp_path / "ref-model", command="kto", ref_model=str(llama_dir), **flags), "kto")
    off = losses(tmp_path / "adapters-off")
    assert off[0] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0): every log-ratio and the KL start at 0
    assert off[-1] < off[0]
    assert losses(tmp_path / "ref-model") == pytest.approx(off, abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# checkpoints, resume, `dialogtrain export`


def assert_same_lora_export(expected: Path, got: Path) -> None:
    """Bit-identical merged weights and adapter weights; the same adapter config."""
    from safetensors.torch import load_file

    want, have = final_weights(expected), final_weights(got)
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (expected, got))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((expected / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((got / "adapter" / "adapter_config.json").read_text())


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_a_lora_checkpoint_holds_the_adapters_resumes_exactly_and_exports_as_final(zero, gpt2_dir, tmp_path):
    """GPT-2 (dropout on, so the RNG state matters): the checkpoint's model states hold the adapter weights
    only, not the frozen base; resumed from step 3 the run ends bit-identical; `dialogtrain export` of the
    last checkpoint writes RUN/final's merged weights and adapter."""
    from dialogtrain.train.checkpoints import safe_torch_load

    flags = dict(model=str(gpt2_dir), data=str(write_pairs_csv(tmp_path / "pairs.csv")), micro_batch=2, lr=5e-3,
                 max_steps=6, save_every=3, precision="fp32", gpus="cpu", lora_r=R, zero=zero)
    run_dir = tmp_path / "run"
    train_in_process(write_run_dir(run_dir, **flags))
    checkpoint = run_dir / "checkpoints" / "step-000003"
    states_file = "mp_rank_00_model_states.pt" if zero < 3 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    with safe_torch_load():
        states = torch.load(checkpoint / states_file, map_location="cpu", weights_only=True)
    adapters = {name: t for name, t in states["module"].items() if ".lora_" in name}
    if zero < 3:
        assert sum(t.numel() for t in adapters.values()) == adapter_parameters(gpt2_dir)
    else:  # ZeRO-3 keeps placeholders there; the weights are the optimizer's partitions of these shapes
        shapes = [shape for group in states["param_shapes"] for shape in group.values()]
        assert sum(math.prod(shape) for shape in shapes) == adapter_parameters(gpt2_dir)
    # DeepSpeed drops each frozen parameter by its first name; the LM head, a second name of the embedding, stays
    assert set(states["module"]) - set(adapters) == {"base_model.model.lm_head.weight"}
    assert (checkpoint / "hf" / "adapter" / "adapter_config.json").is_file()

    resumed = rewind(run_dir, tmp_path / "resumed", step=3)
    train_in_process(write_run_dir(resumed, resume="auto", **flags))
    assert metrics_after(resumed, 3) == metrics_after(run_dir, 3)
    assert_same_lora_export(run_dir / "final", resumed / "final")

    exported = tmp_path / "exported"
    result = CliRunner().invoke(cli, ["export", str(run_dir / "checkpoints" / "step-000006"), "--output",
                                      str(exported)])
    assert result.exit_code == 0, result.output
    assert_same_lora_export(run_dir / "final", exported)


def test_a_bf16_run_exports_bf16_merged_weights_and_the_adapter_as_trained(llama_dir, tmp_path):
    """Dtypes are read, not assumed: --precision bf16 (mixed: the adapters train in fp32) writes RUN/final in
    bf16 (config and weights), the adapter in its training dtype, and `dialogtrain export` the same."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    engine = train_in_process(write_run_dir(
        run_dir, model=str(llama_dir), data=str(write_pairs_csv(tmp_path / "pairs.csv")), micro_batch=4, max_steps=2,
        save_every=2, lr=2e-2, precision="bf16", gpus="cpu", lora_r=R))
    trained = {p.dtype for name, p in engine.module.named_parameters() if p.requires_grad}
    assert json.loads((run_dir / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in final_weights(run_dir / "final").values()} == {torch.bfloat16}
    adapter = load_file(str(run_dir / "final" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == trained
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--output", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    assert_same_lora_export(run_dir / "final", tmp_path / "exported")


# ----------------------------------------------------------------------------------------------------
# chat, plan


def test_chat_with_the_merged_folder_or_the_base_plus_adapter_answers_alike(llama_dir, tmp_path, capsys):
    from dialogtrain.chat.session import run_chat

    run_dir = tmp_path / "run"
    train_in_process(write_run_dir(run_dir, model=str(llama_dir), data=str(write_pairs_csv(tmp_path / "pairs.csv")),
                                   micro_batch=4, max_steps=2, lr=5e-2, precision="fp32", gpus="cpu", lora_r=R))
    capsys.readouterr()
    answer = dict(prompt="hello there", greedy=True, max_new_tokens=8, device="cpu", dtype="fp32")
    assert run_chat(str(run_dir), **answer) == 0
    merged = capsys.readouterr().out
    assert run_chat(str(llama_dir), adapter=str(run_dir / "final" / "adapter"), **answer) == 0
    assert capsys.readouterr().out == merged
    assert run_chat(str(llama_dir), **answer) == 0
    assert capsys.readouterr().out != merged  # the base alone answers otherwise
    with pytest.raises(UserError, match="--adapter .*: not a PEFT adapter folder"):
        run_chat(str(llama_dir), adapter=str(run_dir / "final"), **answer)


def test_plan_counts_the_adapters_and_the_frozen_base(llama_dir, tmp_path):
    """Adapters: DeepSpeed's estimators on them (2 + 18 bytes each at ZeRO-0); the frozen base: 16-bit
    weights whole at ZeRO 0-2, sharded at ZeRO-3; QLoRA: the linear layers in NF4, no ZeRO-3. A 7B Llama
    (config only) LoRA fits one 24 GB GPU, its full fine-tuning does not."""
    from dialogtrain.plan import NF4_BYTES, count_parameters, estimate_memory, plan_report

    lora = LoraOptions(lora_r=R)
    counts = count_parameters(str(llama_dir), lora=lora)
    adapters = adapter_parameters(llama_dir)
    assert counts.trainable == adapters == 4096
    got = {e.flags: e.gpu_bytes for e in estimate_memory(counts, gpus_per_node=2, nnodes=1)}
    assert got["--zero 0"] == 2 * counts.total + 20 * adapters
    assert got["--zero 3"] == 4 * counts.largest_layer + int(18 * adapters / 2) + 2 * counts.total // 2

    qlora = count_parameters(str(llama_dir), lora=LoraOptions(lora_r=R, load_in_4bit=True))
    linear = 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64)  # 2 layers: q, k, v, o, gate, up, down
    assert qlora.quantized == linear
    estimates = estimate_memory(qlora, gpus_per_node=1, nnodes=1)
    assert max(e.zero for e in estimates) == 2
    assert estimates[0].gpu_bytes == 2 * (qlora.total - linear) + math.ceil(NF4_BYTES * linear) + 20 * adapters

    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, max_position_embeddings=4096).save_pretrained(tmp_path / "llama-7b")
    gib24 = 24 * 1024**3
    full = plan_report(str(tmp_path / "llama-7b"), 1, gpu_bytes=gib24, cpu_bytes=64 * 1024**3)
    assert "recommended: none fits" in full
    with_lora = plan_report(str(tmp_path / "llama-7b"), 1, gpu_bytes=gib24, cpu_bytes=64 * 1024**3,
                            lora=LoraOptions(lora_r=16))
    assert "39,976,960 adapter parameters train" in with_lora  # 32 layers x 16 x (4 x 8192 + 3 x 15104)
    assert "recommended: --zero 0, the fastest that fits" in with_lora

    result = CliRunner().invoke(cli, ["plan", "--model", str(llama_dir), "--lora-r", "4", "--load-in-4bit",
                                      "--gpu-memory", "1"])
    assert result.exit_code == 0, result.output
    assert "4,096 adapter parameters train" in result.output and "--zero 3" not in result.output


# ----------------------------------------------------------------------------------------------------
# QLoRA


QLORA_OPTIONS = RunOptions(lora=LoraOptions(lora_r=R, load_in_4bit=True), optim=OptimOptions(precision="fp32"))


def test_load_in_4bit_without_bitsandbytes_names_the_package(monkeypatch):
    from dialogtrain.train.lora import quantization_args

    assert quantization_args(RunOptions(lora=LoraOptions(lora_r=R)), "cpu") is None
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails
    with pytest.raises(UserError, match=r"--load-in-4bit needs bitsandbytes, which is not installed .*"
                                        r"pip install 'dialogtrain\[qlora\]'"):
        quantization_args(QLORA_OPTIONS, "cpu")


def test_load_in_4bit_on_a_device_bitsandbytes_cannot_run_says_so():
    pytest.importorskip("bitsandbytes")  # the test extra installs it; `pip install 'dialogtrain[qlora]'`
    from dialogtrain.train.lora import quantization_args

    with pytest.raises(UserError, match=r"bitsandbytes \S+ cannot run 4-bit layers on meta .*"
                                        r"run without --load-in-4bit"):
        quantization_args(QLORA_OPTIONS, "meta")


def qlora_run(model_dir: Path, tmp_path: Path, gpus: str, precision: str) -> tuple:
    run_dir = tmp_path / "run"
    engine = train_in_process(write_run_dir(
        run_dir, model=str(model_dir), data=str(write_pairs_csv(tmp_path / "pairs.csv")), micro_batch=4, max_steps=4,
        lr=2e-2, precision=precision, gpus=gpus, lora_r=R, load_in_4bit=True, save_every=4))
    return engine, run_dir


def check_qlora_run(engine, run_dir: Path, tolerance: float) -> None:
    """The loss falls; the base stayed 4-bit with adapters in full precision; the merged export (base
    dequantized, adapters added) gives the trained model's logits; `dialogtrain export` of the checkpoint
    quantizes the base again and writes the same folder."""
    from transformers import AutoModelForCausalLM

    run_losses = losses(run_dir)
    assert run_losses[-1] < run_losses[0]
    kinds = {type(p).__name__ for name, p in engine.module.named_parameters() if "base_layer" in name}
    assert kinds == {"Params4bit"}
    device = next(p.device for p in engine.module.parameters())
    engine.module.eval()
    with torch.no_grad():
        want = engine.module(input_ids=IDS.to(device)).logits.float().cpu()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32)
    assert (logits(merged) - want).abs().max() < tolerance
    exported = run_dir.parent / "exported"
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--output", str(exported)])
    assert result.exit_code == 0, result.output
    assert_same_lora_export(run_dir / "final", exported)


def test_qlora_trains_and_exports_the_dequantized_merged_model_on_this_cpu(llama_dir, tmp_path):
    from dialogtrain.train.lora import bitsandbytes_problem

    why = bitsandbytes_problem(torch.device("cpu"), torch.float32)
    if why:
        pytest.skip(f"bitsandbytes cannot run 4-bit layers on this CPU: {why}")
    check_qlora_run(*qlora_run(llama_dir, tmp_path, "cpu", "fp32"), tolerance=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_on_a_gpu(llama_dir, tmp_path):
    check_qlora_run(*qlora_run(llama_dir, tmp_path, "0", "bf16"), tolerance=5e-2)


# ----------------------------------------------------------------------------------------------------
# two processes under ZeRO-3


@pytest.mark.slow
def test_zero3_on_two_processes_exports_the_one_process_weights_and_a_whole_adapter(llama_dir, tmp_path):
    """The same 2 steps of global batch 4 as 1 process x grad-accum 2 (ZeRO-0) and as 2 processes x
    micro-batch 2 under ZeRO-3: the same merged weights and adapter (1e-5), the adapter's tensors whole
    (gathered before saving, none of shape [0])."""
    from safetensors.torch import load_file

    data = write_pairs_csv(tmp_path / "pairs.csv")
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    common = ["sft", "--model", str(llama_dir), "--data", str(data), "--precision", "fp32", "--lr", "1e-3",
              "--max-steps", "2", "--micro-batch", "2", "--lora-r", str(R), "--gpus", "cpu"]
    for name, more in [("one", ["--nproc", "1", "--grad-accum", "2"]), ("two", ["--nproc", "2", "--zero", "3"])]:
        done = subprocess.run([sys.executable, "-m", "launcher.cli", *common, "--output", str(tmp_path / name), *more],
                              env=env, cwd=repo, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    one, two = final_weights(tmp_path / "one" / "final"), final_weights(tmp_path / "two" / "final")
    assert one.keys() == two.keys() and max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    a, b = (load_file(str(tmp_path / name / "final" / "adapter" / "adapter_model.safetensors")) for name in ("one", "two"))
    assert a.keys() == b.keys() and all(b[k].numel() > 0 and b[k].shape == a[k].shape for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 1e-4  # trained, not the zero start
