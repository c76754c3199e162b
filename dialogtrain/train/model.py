"""Loading a causal LM and its tokenizer from a folder, a .gguf file or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

from dialogtrain.errors import UserError, first_line


def resolve_model_path(model: str) -> str:
    """A .gguf file becomes its converted Hugging Face folder (cached); a missing local path is an error."""
    if model.endswith(".gguf"):
        from dialogtrain.export.gguf import resolve_model

        return resolve_model(model)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"--model {model}: folder has no config.json (not a Hugging Face model folder)")
        return str(path)
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise UserError(f"--model {model}: no such folder")
    return model  # a hub id: "org/name" or "name"


def load_tokenizer(model: str, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer, with pad = EOS when it has none (padding is then known from the attention mask)
    and the chat template `--chat-template` asks for (data.templates.set_chat_template)."""
    from transformers import AutoTokenizer

    from dialogtrain.data.templates import prepare_tokenizer, set_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    except OSError as err:
        raise UserError(f"could not load the tokenizer of {model!r}: {first_line(err)}") from None
    return set_chat_template(prepare_tokenizer(tokenizer), chat_template)


def load_model(model: str, tokenizer, trust_remote_code: bool = False):
    """The causal LM `model` names (load_tokenizer gave `tokenizer`), weights in fp32 (DeepSpeed casts for
    bf16/fp16), KV cache off for training, pad token id set from the tokenizer when the config has none."""
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype="float32",
                                                  trust_remote_code=trust_remote_code)
    except OSError as err:
        raise UserError(f"could not load the model {model!r}: {first_line(err)}") from None
    lm.config.use_cache = False
    if lm.config.pad_token_id is None:
        lm.config.pad_token_id = tokenizer.pad_token_id
    return lm


def recompute_activations(model) -> None:
    """--gradient-checkpointing: each decoder layer keeps only its input in the forward pass and runs
    again in the backward pass (transformers' gradient checkpointing, non-reentrant): activation memory
    of about one layer instead of all of them, for about a third more compute. Same gradients."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"--gradient-checkpointing: {type(model).__name__} does not support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
