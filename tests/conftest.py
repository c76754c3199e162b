"""Shared fixtures: tiny random models built from a config, with tokenizers trained on the spot.

Nothing touches the network: each model folder is written with `save_pretrained` and read back
through the real `from_pretrained` code, exactly as a user's checkpoint would be.

- `gpt2_dir`:  GPT-2 config (the DialoGPT path): tied embeddings, no chat template, EOS only.
- `llama_dir`: Llama config with a ChatML chat template, untied embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The suite runs on the CPU, also on a machine with GPUs: no GPU is visible to it or to the processes it
# starts, and DeepSpeed takes its CPU accelerator (gloo), so every tolerance is the CPU's. `make gpu-check`
# runs the `gpu` tests with DIALOGTRAIN_TEST_DEVICE=cuda, which leaves the GPUs visible.
GPU_SESSION = os.environ.get("DIALOGTRAIN_TEST_DEVICE") == "cuda"
if not GPU_SESSION:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["DS_ACCELERATOR"] = "cpu"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run in a GPU session only (with CUDA there); other tests only outside one."""
    for item in items:
        if ("gpu" in item.keywords) != GPU_SESSION:
            reason = ("a GPU test: run it with `make gpu-check`" if not GPU_SESSION
                      else "a CPU test: the GPU session runs the gpu tests only")
            item.add_marker(pytest.mark.skip(reason=reason))

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

CORPUS = [
    "hello there how are you today",
    "i am fine thank you and you",
    "what is your name",
    "my name is bot and i like to chat",
    "what is the weather like",
    "it is sunny and warm outside",
    "tell me a joke please",
    "why did the chicken cross the road",
    "good bye see you later",
    "the quick brown fox jumps over the lazy dog",
    "system user assistant you are a helpful bot",
    "0 1 2 3 4 5 6 7 8 9 ? ! . , : ; ' \" ( ) -",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe(specials: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on CORPUS (the `tokenizers` library, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def build_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 with tied embeddings and a GPT-2 style tokenizer (EOS, no pad, no template)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast(tokenizer_object=train_bpe(["<|endoftext|>"]),
                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", model_max_length=128)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        tie_word_embeddings=True)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with a ChatML chat template (`<|im_end|>` ends every turn and is the EOS)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_bpe(["<|im_start|>", "<|im_end|>", "<pad>"]),
                                        bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<pad>", model_max_length=256)
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_dir)


@pytest.fixture(scope="session")
def llama_tokenizer(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)
