"""Exact token ids and labels of dialogue rendering, on both paths, and of every truncation rule.

Expected ids are composed from `encode` of the pieces the format is made of, so each test states the
format itself; -100 (IGNORE) marks tokens that are not learned.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dialogtrain.data.encode import (
    IGNORE_INDEX,
    MIN_PROMPT_TOKENS,
    EncodeStats,
    encode_conversations,
    encode_preferences,
    render_conversation,
    render_preference,
    render_prompt,
)
from dialogtrain.data.templates import (
    DIALOGPT_CHAT_TEMPLATE,
    prepare_tokenizer,
    set_chat_template,
    uses_chat_template,
)

IGNORE = IGNORE_INDEX

SYSTEM = {"role": "system", "content": "you are a helpful bot"}
EXCHANGES = [
    ("hello there how are you", "i am fine thank you"),
    ("what is the weather like", "it is sunny and warm"),
    ("tell me a joke please", "why did the chicken cross the road"),
]


def conversation(exchanges, system=False) -> list[dict]:
    messages = [SYSTEM] if system else []
    for user, assistant in exchanges:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def learned(labels: list[int]) -> list[int]:
    return [label for label in labels if label != IGNORE]


@pytest.fixture
def dialogpt(gpt2_dir):
    """A fresh GPT-2 tokenizer per test (prepare_tokenizer mutates; the session fixture stays untouched)."""
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(gpt2_dir))


@pytest.fixture
def chatml(llama_dir):
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(llama_dir))


# ----------------------------------------------------------------------------------------------------
# the DialoGPT path


def test_prepare_tokenizer_pads_with_eos_only_when_there_is_no_pad(dialogpt, chatml):
    assert dialogpt.pad_token == dialogpt.eos_token == "<|endoftext|>"
    assert dialogpt.pad_token_id == dialogpt.eos_token_id
    assert chatml.pad_token == "<pad>" and chatml.pad_token_id != chatml.eos_token_id
    assert not uses_chat_template(dialogpt) and dialogpt.chat_template is None
    assert uses_chat_template(chatml)


def test_dialogpt_exact_ids_and_labels(dialogpt):
    tok, eos = dialogpt, dialogpt.eos_token_id
    u1, a1, u2, a2 = (enc(tok, text) for pair in EXCHANGES[:2] for text in pair)

    ids, labels = render_conversation(tok, conversation(EXCHANGES[:2]))

    assert ids == u1 + [eos] + a1 + [eos] + u2 + [eos] + a2 + [eos]
    assert labels == [IGNORE] * (len(u1) + 1) + a1 + [eos] + [IGNORE] * (len(u2) + 1) + a2 + [eos]
    # pad == eos, yet the EOS that ends the reply is a target: the bot learns to stop.
    assert labels[-1] == eos == tok.pad_token_id
    assert tok.decode(learned(labels)) == "i am fine thank you<|endoftext|>it is sunny and warm<|endoftext|>"


def test_dialogpt_system_message_is_a_turn_that_is_not_learned(dialogpt):
    tok, eos = dialogpt, dialogpt.eos_token_id
    ids, labels = render_conversation(tok, conversation(EXCHANGES[:1], system=True))

    system, user, bot = enc(tok, SYSTEM["content"]), enc(tok, EXCHANGES[0][0]), enc(tok, EXCHANGES[0][1])
    assert ids == system + [eos] + user + [eos] + bot + [eos]
    assert labels == [IGNORE] * (len(system) + len(user) + 2) + bot + [eos]


def test_dialogpt_matches_its_chat_template(dialogpt, gpt2_dir):
    from transformers import AutoTokenizer

    messages = conversation(EXCHANGES, system=True)
    ids, labels = render_conversation(dialogpt, messages)
    templated = dialogpt.apply_chat_template(messages, chat_template=DIALOGPT_CHAT_TEMPLATE, tokenize=True,
                                             return_dict=False)
    assert ids == templated

    prompt = messages[:-1]
    assert render_prompt(dialogpt, prompt) == dialogpt.apply_chat_template(
        prompt, chat_template=DIALOGPT_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=True,
        return_dict=False)
    assert render_prompt(dialogpt, prompt) == ids[:len(ids) - len(enc(dialogpt, EXCHANGES[-1][1])) - 1]

    # An exported tokenizer carries the template: the template path gives the same ids AND labels.
    exported = AutoTokenizer.from_pretrained(gpt2_dir)
    exported.chat_template = DIALOGPT_CHAT_TEMPLATE
    assert render_conversation(exported, messages) == (ids, labels)
    assert render_prompt(exported, prompt) == render_prompt(dialogpt, prompt)


# ----------------------------------------------------------------------------------------------------
# the chat-template path (ChatML)


def test_chatml_exact_ids_and_labels(chatml):
    tok = chatml
    end = tok.convert_tokens_to_ids("<|im_end|>")
    newline = enc(tok, "\n")
    (u1, a1), (u2, a2) = EXCHANGES[:2]

    ids, labels = render_conversation(tok, conversation(EXCHANGES[:2], system=True))

    head = enc(tok, f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>\n<|im_start|>user\n{u1}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    middle = enc(tok, f"<|im_start|>user\n{u2}<|im_end|>\n<|im_start|>assistant\n")
    answer1, answer2 = enc(tok, a1) + [end], enc(tok, a2) + [end]
    assert len(newline) == 1
    assert ids == head + answer1 + newline + middle + answer2 + newline
    assert labels == ([IGNORE] * len(head) + answer1 + [IGNORE] + [IGNORE] * len(middle) + answer2 + [IGNORE])
    assert ids == tok.apply_chat_template(conversation(EXCHANGES[:2], system=True), tokenize=True,
                                          return_dict=False)
    assert tok.decode(learned(labels)) == f"{a1}<|im_end|>{a2}<|im_end|>"


def test_chatml_render_prompt_ends_with_the_generation_prompt(chatml):
    prompt = conversation(EXCHANGES[:1]) + [{"role": "user", "content": "what is your name"}]
    ids = render_prompt(chatml, prompt)
    assert ids == enc(chatml, chatml.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    assert chatml.decode(ids).endswith("what is your name<|im_end|>\n<|im_start|>assistant\n")


def test_roles_out_of_order_are_refused(chatml, dialogpt):
    user, bot = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    for tok in (chatml, dialogpt):
        for messages in ([bot], [user], [user, user, bot], [user, bot, bot], [user, SYSTEM, bot], []):
            with pytest.raises(ValueError, match="roles must read"):
                render_conversation(tok, messages)
        with pytest.raises(ValueError, match="roles must read"):
            render_prompt(tok, [user, bot])


def test_a_template_that_is_not_prefix_stable_is_refused(chatml):
    # Marks the last message, so a shorter conversation renders differently from the start of a longer one.
    chatml.chat_template = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}"
                            "{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ValueError, match="not prefix-stable"):
        render_conversation(chatml, conversation(EXCHANGES[:1]))


def test_assistant_content_with_trailing_whitespace_keeps_it_learned(chatml):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there\n"}]
    ids, labels = render_conversation(chatml, messages)
    assert chatml.decode(learned(labels)) == "hello there\n<|im_end|>"
    assert labels[-1] == IGNORE


# ----------------------------------------------------------------------------------------------------
# truncation of conversations


@pytest.mark.parametrize("path", ["dialogpt", "chatml"])
def test_history_truncation_drops_exactly_the_oldest_exchanges(path, request):
    tok = request.getfixturevalue(path)
    messages = conversation(EXCHANGES, system=True)
    whole = render_conversation(tok, messages)
    last_two = render_conversation(tok, conversation(EXCHANGES[1:], system=True))
    last_one = render_conversation(tok, conversation(EXCHANGES[2:], system=True))

    fits, stats = encode_conversations(tok, [messages], max_length=len(whole[0]))
    assert fits == [{"input_ids": whole[0], "labels": whole[1]}]
    assert stats == EncodeStats(examples=1)

    examples, stats = encode_conversations(tok, [messages], max_length=len(last_two[0]))
    assert examples == [{"input_ids": last_two[0], "labels": last_two[1]}]
    assert stats == EncodeStats(examples=1, history_truncated=1)

    examples, stats = encode_conversations(tok, [messages, messages], max_length=len(last_two[0]) - 1)
    assert examples == [{"input_ids": last_one[0], "labels": last_one[1]}] * 2
    assert stats == EncodeStats(examples=2, history_truncated=2)

    # Not even the system message fits with the last exchange: it goes too.
    without_system = render_conversation(tok, conversation(EXCHANGES[2:]))
    examples, stats = encode_conversations(tok, [messages], max_length=len(last_one[0]) - 1)
    assert examples == [{"input_ids": without_system[0], "labels": without_system[1]}]
    assert stats == EncodeStats(examples=1, history_truncated=1)


def test_a_long_response_is_cut_at_its_end(dialogpt):
    tok, eos = dialogpt, dialogpt.eos_token_id
    reply = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
    messages = [{"role": "user", "content": "tell me a joke please"}, {"role": "assistant", "content": reply}]
    user, bot = enc(tok, "tell me a joke please"), enc(tok, reply)
    max_length = 20
    assert len(user) + 1 <= max_length // 2 < len(bot)

    examples, stats = encode_conversations(tok, [messages], max_length)
    kept = max_length - len(user) - 1
    assert examples == [{"input_ids": user + [eos] + bot[:kept], "labels": [IGNORE] * (len(user) + 1) + bot[:kept]}]
    assert stats == EncodeStats(examples=1, response_truncated=1)


def test_a_long_prompt_and_response_share_max_length(chatml):
    tok = chatml
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
    messages = [SYSTEM, {"role": "user", "content": long_text}, {"role": "assistant", "content": long_text}]
    ids, labels = render_conversation(tok, messages[1:])
    prompt = len(enc(tok, f"<|im_start|>user\n{long_text}<|im_end|>\n<|im_start|>assistant\n"))
    max_length = 31

    examples, stats = encode_conversations(tok, [messages], max_length)
    # The prompt keeps its last 15 tokens (max_length // 2), the response its first 16.
    window = slice(prompt - max_length // 2, prompt + max_length - max_length // 2)
    assert examples == [{"input_ids": ids[window], "labels": labels[window]}]
    assert labels[window] == [IGNORE] * 15 + ids[prompt:prompt + 16]
    assert tok.decode(ids[window]) == ("s over the lazy dog<|im_end|>\n<|im_start|>assistant\n"
                                       "the quick brown fox jumps over the lazy dog the qu")
    assert stats == EncodeStats(examples=1, history_truncated=1, response_truncated=1)


def test_a_long_prompt_before_a_short_response_keeps_all_the_room_it_can(dialogpt):
    tok, eos = dialogpt, dialogpt.eos_token_id
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
    messages = [{"role": "user", "content": long_text}, {"role": "assistant", "content": "ok"}]
    user, bot = enc(tok, long_text), enc(tok, "ok")
    max_length = 20

    examples, stats = encode_conversations(tok, [messages], max_length)
    keep = max_length - len(bot) - 1
    assert keep > max_length // 2
    assert examples == [{"input_ids": (user + [eos])[-keep:] + bot + [eos],
                         "labels": [IGNORE] * keep + bot + [eos]}]
    assert stats == EncodeStats(examples=1, history_truncated=1)


def test_a_conversation_with_nothing_to_learn_is_skipped(chatml):
    # A template that renders no assistant turn leaves no learnable token.
    chatml.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    examples, stats = encode_conversations(chatml, [conversation(EXCHANGES[:1])], max_length=64)
    assert examples == [] and stats == EncodeStats(skipped=1)
    assert "0 examples" in stats.summary() and "1 skipped" in stats.summary()


def test_summary_names_every_count():
    stats = EncodeStats(examples=120, history_truncated=3, response_truncated=1, skipped=2)
    assert stats.summary() == ("120 examples; 3 lost their oldest turns, 1 response cut at max length, "
                               "2 skipped (nothing to learn)")


# ----------------------------------------------------------------------------------------------------
# preferences


PROMPT = conversation(EXCHANGES[:1], system=True) + [{"role": "user", "content": "what is your name"}]


@pytest.mark.parametrize("path", ["dialogpt", "chatml"])
def test_preference_learns_only_the_completion(path, request):
    tok = request.getfixturevalue(path)
    end = tok.eos_token_id  # <|endoftext|> for DialoGPT, <|im_end|> for ChatML
    prompt_ids = render_prompt(tok, PROMPT)
    chosen, rejected = "my name is bot", "good bye"

    chosen_ids, chosen_labels, rejected_ids, rejected_labels, truncated = render_preference(
        tok, PROMPT, chosen, rejected, max_length=256)

    assert chosen_ids == prompt_ids + enc(tok, chosen) + [end]
    assert rejected_ids == prompt_ids + enc(tok, rejected) + [end]
    # The assistant turn inside the prompt is learned in SFT, not here.
    assert chosen_labels == [IGNORE] * len(prompt_ids) + enc(tok, chosen) + [end]
    assert rejected_labels == [IGNORE] * len(prompt_ids) + enc(tok, rejected) + [end]
    assert not truncated
    # The same mask as SFT on the completion.
    sft_labels = render_conversation(tok, PROMPT + [{"role": "assistant", "content": chosen}])[1]
    assert sft_labels[len(prompt_ids):len(chosen_labels)] == chosen_labels[len(prompt_ids):]


def test_preference_prompt_keeps_its_end(chatml):
    tok, end = chatml, chatml.eos_token_id
    prompt_ids = render_prompt(tok, PROMPT)
    chosen, rejected = "my name is bot", "good bye see you later"
    completion = enc(tok, rejected) + [end]  # the longer one
    max_length = len(prompt_ids) - 5 + len(completion)

    chosen_ids, chosen_labels, rejected_ids, rejected_labels, truncated = render_preference(
        tok, PROMPT, chosen, rejected, max_length)

    kept = prompt_ids[5:]
    assert chosen_ids == kept + enc(tok, chosen) + [end]
    assert rejected_ids == kept + completion and len(rejected_ids) == max_length
    assert chosen_labels == [IGNORE] * len(kept) + enc(tok, chosen) + [end]
    assert rejected_labels == [IGNORE] * len(kept) + completion
    assert truncated


def test_preference_completion_longer_than_max_length_keeps_a_few_prompt_tokens(dialogpt):
    tok, eos = dialogpt, dialogpt.eos_token_id
    prompt_ids = render_prompt(tok, PROMPT)
    long_reply = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
    max_length = 20

    chosen_ids, chosen_labels, rejected_ids, rejected_labels, truncated = render_preference(
        tok, PROMPT, long_reply, "ok", max_length)

    kept = prompt_ids[-MIN_PROMPT_TOKENS:]
    room = max_length - MIN_PROMPT_TOKENS
    assert chosen_ids == kept + enc(tok, long_reply)[:room]
    assert chosen_labels == [IGNORE] * MIN_PROMPT_TOKENS + enc(tok, long_reply)[:room]
    assert rejected_ids == kept + enc(tok, "ok") + [eos]
    assert rejected_labels == [IGNORE] * MIN_PROMPT_TOKENS + enc(tok, "ok") + [eos]
    assert truncated


def test_encode_preferences_counts_what_it_cut(dialogpt):
    long_reply = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
    short = SimpleNamespace(prompt=PROMPT[1:2], chosen="my name is bot", rejected="good bye")
    long_prompt = SimpleNamespace(prompt=PROMPT, chosen="my name is bot", rejected="good bye")
    long_completion = SimpleNamespace(prompt=PROMPT, chosen=long_reply, rejected="ok")
    max_length = 20
    assert len(render_prompt(dialogpt, PROMPT)) > max_length

    examples, stats = encode_preferences(dialogpt, [short, long_prompt, long_completion], max_length)

    assert stats == EncodeStats(examples=3, history_truncated=2, response_truncated=1)
    expected = render_preference(dialogpt, short.prompt, short.chosen, short.rejected, max_length)
    assert examples[0] == dict(zip(["chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"],
                                   expected[:4], strict=True))
    assert all(len(example[key]) <= max_length for example in examples for key in example)


# ----------------------------------------------------------------------------------------------------
# --chat-template: the plain-text "user: / assistant:" format of GPT-2 chat models, and the others


@pytest.fixture
def user_assistant(gpt2_dir):
    from transformers import AutoTokenizer

    return set_chat_template(prepare_tokenizer(AutoTokenizer.from_pretrained(gpt2_dir)), "user-assistant")


def test_user_assistant_exact_ids_and_labels(user_assistant):
    """"user: hi\nassistant: hello<EOS>\n": the reply with its leading space and its EOS are learned; the
    newline after the EOS is not."""
    tok, eos = user_assistant, user_assistant.eos_token_id
    (u1, a1), (u2, a2) = EXCHANGES[:2]
    ids, labels = render_conversation(tok, conversation([(u1, a1), (u2, a2)]))
    prompt1, prompt2, nl = enc(tok, f"user: {u1}\nassistant:"), enc(tok, f"user: {u2}\nassistant:"), enc(tok, "\n")
    reply1, reply2 = enc(tok, " " + a1) + [eos], enc(tok, " " + a2) + [eos]
    assert ids == prompt1 + reply1 + nl + prompt2 + reply2 + nl
    assert learned(labels) == reply1 + reply2
    assert tok.decode(ids) == f"user: {u1}\nassistant: {a1}<|endoftext|>\nuser: {u2}\nassistant: {a2}<|endoftext|>\n"


def test_user_assistant_prompt_ends_with_assistant_colon(user_assistant):
    ids = render_prompt(user_assistant, [SYSTEM, {"role": "user", "content": "hello there"}])
    assert user_assistant.decode(ids) == "system: you are a helpful bot\nuser: hello there\nassistant:"


def test_user_assistant_preference_learns_the_completion_only(user_assistant):
    tok, eos = user_assistant, user_assistant.eos_token_id
    prompt = [{"role": "user", "content": "what is your name"}]
    chosen_ids, chosen_labels, rejected_ids, rejected_labels, cut = render_preference(
        tok, prompt, "my name is bot", "the quick brown fox", max_length=64)
    head = enc(tok, "user: what is your name\nassistant:")
    assert chosen_ids == head + enc(tok, " my name is bot") + [eos] and not cut
    assert learned(chosen_labels) == enc(tok, " my name is bot") + [eos]
    assert learned(rejected_labels) == enc(tok, " the quick brown fox") + [eos]
    assert rejected_ids[:len(head)] == head


def test_set_chat_template_choices(chatml, tmp_path):
    own = chatml.chat_template
    assert set_chat_template(chatml, None).chat_template == own
    assert set_chat_template(chatml, "model").chat_template == own
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert set_chat_template(chatml, str(template)).chat_template == template.read_text()
    assert set_chat_template(chatml, "dialogpt").chat_template is None and not uses_chat_template(chatml)
