"""Loading a causal LM and its tokenizer from a folder, a .gguf file or a hub id."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from dialogtrain.errors import UserError, first_line

# bench/: load the whole model on every rank before ZeRO-3 partitions it (the way before zero.Init), to
# measure what partitioned loading saves
WHOLE_LOAD_ENV = "DIALOGTRAIN_WHOLE_LOAD"


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


def load_model(model: str, tokenizer, trust_remote_code: bool = False, quantization: dict | None = None,
               ds_config: dict | None = None, dtype: str = "float32"):
    """The causal LM `model` names (load_tokenizer gave `tokenizer`), its weights in `dtype` (the dtype it
    trains in: fp32, bf16 for --precision pure-bf16), KV cache off for training, pad token id set from the
    tokenizer when the config has none. `quantization`: from_pretrained arguments that quantize the weights
    as they load (train.lora, QLoRA). `ds_config` at ZeRO-3: the weights are partitioned across the ranks
    as they load (DeepSpeed's zero.Init), so no rank ever holds the whole model in host memory."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    try:
        with partitioned_loading(path, ds_config if not quantization else None, trust_remote_code):
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                      **(quantization or {}))
    except OSError as err:
        raise UserError(f"could not load the model {model!r}: {first_line(err)}") from None
    lm.config.use_cache = False
    if lm.config.pad_token_id is None:
        lm.config.pad_token_id = tokenizer.pad_token_id
    return lm


@contextlib.contextmanager
def partitioned_loading(path: str, ds_config: dict | None, trust_remote_code: bool) -> Iterator[None]:
    """Inside, from_pretrained loads under DeepSpeed's zero.Init when `ds_config` is at ZeRO-3: transformers
    does so while an HfDeepSpeedConfig of it is alive (its "auto" sizes resolved from the model's hidden size)."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3 \
            or os.environ.get(WHOLE_LOAD_ENV) == "1":
        yield
        return
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    from dialogtrain.train.engine import resolve_auto_sizes

    hidden = getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "hidden_size", None)
    keep_alive = HfDeepSpeedConfig(resolve_auto_sizes(ds_config, hidden))  # transformers holds a weak reference
    try:
        yield
    finally:
        del keep_alive


def recompute_activations(model) -> None:
    """--gradient-checkpointing: each decoder layer keeps only its input in the forward pass and runs
    again in the backward pass (transformers' gradient checkpointing, non-reentrant): activation memory
    of about one layer instead of all of them, for about a third more compute. Same gradients."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"--gradient-checkpointing: {type(model).__name__} does not support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
