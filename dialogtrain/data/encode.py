"""Tokenizing conversations and preference pairs: token ids, labels (only the bot's tokens learned), truncation.

Two renderings, picked by the tokenizer alone:
- chat-template path (the tokenizer has `chat_template`): the text is what `apply_chat_template`
  renders; each assistant turn and the end-of-turn token that closes it are learned.
- DialoGPT path (no template: GPT-2, DialoGPT): every turn is its content followed by EOS; the
  assistant's content and its closing EOS are learned, so the bot learns to stop.

Labels equal the ids on learned tokens and IGNORE_INDEX elsewhere. A message is a dict
{"role": "system" | "user" | "assistant", "content": str}; a conversation is an optional leading
system message, then user and assistant alternating, starting with user.
"""

from __future__ import annotations

from dataclasses import dataclass

from dialogtrain.data.templates import uses_chat_template

IGNORE_INDEX = -100

# Fewest prompt tokens a preference pair keeps when its responses alone overflow max_length.
MIN_PROMPT_TOKENS = 8


# ----------------------------------------------------------------------------------------------------
# rendering one conversation


def _check_roles(messages: list[dict], last: str) -> None:
    """Raise ValueError unless the roles read [system], user, assistant, user, ..., `last`."""
    roles = [message["role"] for message in messages]
    body = roles[1:] if roles[:1] == ["system"] else roles
    alternating = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or body != alternating[:len(body)] or body[-1] != last:
        raise ValueError(f"roles must read [system], user, assistant, ..., {last}; got {roles}")


def render_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation ending with an assistant turn.

    DialoGPT path, with E the EOS id:
        [user "hi", assistant "hello"] -> ids    = enc("hi") + [E] + enc("hello") + [E]
                                          labels = [-100] * (len(enc("hi")) + 1) + enc("hello") + [E]
    ChatML template: in "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\nhello<|im_end|>\\n"
    only the tokens of "hello<|im_end|>" are learned.
    """
    _check_roles(messages, last="assistant")
    if not uses_chat_template(tokenizer):
        ids, labels = [], []
        for message in messages:
            turn = _dialogpt_turn(tokenizer, message["content"])
            ids += turn
            labels += turn if message["role"] == "assistant" else [IGNORE_INDEX] * len(turn)
        return ids, labels

    text = _render_text(tokenizer, messages)
    spans = [_assistant_span(tokenizer, messages, i, text)
             for i, message in enumerate(messages) if message["role"] == "assistant"]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(encoding["input_ids"])
    learned = _inside_spans(encoding["offset_mapping"], spans)
    return ids, [i if keep else IGNORE_INDEX for i, keep in zip(ids, learned, strict=True)]


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of a prompt ending with a user turn, ready for generation.

    Template path: the template with add_generation_prompt=True (ChatML ends "<|im_start|>assistant\\n").
    DialoGPT path: every turn followed by EOS, [user "hi"] -> enc("hi") + [E].
    """
    _check_roles(messages, last="user")
    return _render_ids(tokenizer, messages, add_generation_prompt=True)


def _dialogpt_turn(tokenizer, content: str) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError("a tokenizer without a chat template needs an EOS token to end each turn")
    return tokenizer.encode(content, add_special_tokens=False, verbose=False) + [tokenizer.eos_token_id]


def _render_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    if not uses_chat_template(tokenizer):
        return [i for message in messages for i in _dialogpt_turn(tokenizer, message["content"])]
    # The template writes its own BOS, so the tokenizer must not add another.
    text = _render_text(tokenizer, messages, add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _assistant_span(tokenizer, messages: list[dict], i: int, text: str) -> tuple[int, int]:
    """Character span of assistant turn `i` in `text`: its content and end-of-turn token.

    It starts after the generation prompt that precedes it and ends where the conversation up to it
    ends, less trailing whitespace (the newline after "<|im_end|>" is not the bot's to learn).
    """
    before = _render_text(tokenizer, messages[:i], add_generation_prompt=True)
    through = _render_text(tokenizer, messages[:i + 1])
    if not (text.startswith(before) and text.startswith(through)):
        raise ValueError(
            f"the chat template is not prefix-stable: rendering the first {i} (or {i + 1}) messages does not "
            "give the start of the whole conversation, so assistant turns cannot be located. Templates that "
            "rewrite earlier turns (e.g. drop past reasoning) or mark the last message are not supported")
    start = len(before)
    return start, max(start, len(through.rstrip()))


def _inside_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token's (start, end) character offsets: does it lie inside one of the sorted spans?"""
    inside, k = [], 0
    for start, end in offsets:
        # Offsets grow along the text, so spans ending before this token never matter again.
        while k < len(spans) and spans[k][1] < end:
            k += 1
        inside.append(k < len(spans) and spans[k][0] <= start)
    return inside


# ----------------------------------------------------------------------------------------------------
# preferences


def render_preference(tokenizer, prompt: list[dict], chosen: str, rejected: str, max_length: int
                      ) -> tuple[list[int], list[int], list[int], list[int], bool]:
    """(chosen_ids, chosen_labels, rejected_ids, rejected_labels, truncated) of one preference pair.

    Each sequence is the prompt's ids (render_prompt) followed by the completion: the assistant turn
    as the template renders it after the generation prompt, up to its end-of-turn token (DialoGPT:
    content ids + EOS). Labels learn only the completion, with the same mask as SFT.
    Example (DialoGPT, prompt [user "hi"], chosen "yes"):
        chosen_ids = enc("hi") + [E] + enc("yes") + [E], chosen_labels = [-100] * (len(enc("hi")) + 1) + enc("yes") + [E]

    Over max_length: the prompt keeps its end (left-truncated) so prompt + longest completion fits;
    if the longest completion alone exceeds max_length - MIN_PROMPT_TOKENS, the prompt keeps its
    last MIN_PROMPT_TOKENS tokens and both completions are cut at the end to fit.
    """
    *sequences, prompt_cut, completion_cut = _fit_preference(tokenizer, prompt, chosen, rejected, max_length)
    return (*sequences, prompt_cut or completion_cut)


def _fit_preference(tokenizer, prompt, chosen, rejected, max_length):
    """render_preference's work, telling apart a cut prompt and a cut completion (for EncodeStats)."""
    sequences, _, prompt_cut, completion_cut = _fit_completions(tokenizer, prompt, (chosen, rejected), max_length)
    return (*sequences, prompt_cut, completion_cut)


def _fit_completions(tokenizer, prompt, texts, max_length):
    """([ids, labels, ids, labels, ...] of prompt + each completion, prompt tokens kept, prompt_cut,
    completion_cut): the completions share the prompt's kept ids, truncated as render_preference says."""
    if max_length <= MIN_PROMPT_TOKENS:
        raise ValueError(f"max_length {max_length} leaves no room for a response after "
                         f"{MIN_PROMPT_TOKENS} prompt tokens")
    prompt_ids = render_prompt(tokenizer, prompt)
    completions = [_completion(tokenizer, prompt, prompt_ids, text) for text in texts]
    longest = max(len(ids) for ids, _ in completions)
    n = len(prompt_ids)
    if n + longest <= max_length:
        keep_prompt, keep_completion = n, longest
    elif longest <= max_length - MIN_PROMPT_TOKENS:
        keep_prompt, keep_completion = max_length - longest, longest
    else:
        keep_prompt = min(n, MIN_PROMPT_TOKENS)
        keep_completion = max_length - keep_prompt
    kept = prompt_ids[n - keep_prompt:]
    sequences = []
    for ids, labels in completions:
        sequences += [kept + ids[:keep_completion], [IGNORE_INDEX] * keep_prompt + labels[:keep_completion]]
    return sequences, keep_prompt, keep_prompt < n, keep_completion < longest


def _completion(tokenizer, prompt, prompt_ids, text) -> tuple[list[int], list[int]]:
    """(ids, labels) that follow `prompt_ids` when the assistant answers `text`, up to the last learned token."""
    ids, labels = render_conversation(tokenizer, prompt + [{"role": "assistant", "content": text}])
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the prompt tokenizes differently once a response follows it, so chosen and "
                         "rejected could not share the prompt's ids")
    ids, labels = ids[len(prompt_ids):], labels[len(prompt_ids):]
    # Whitespace after the end-of-turn token is not learned and tells DPO nothing.
    end = max((j + 1 for j, label in enumerate(labels) if label != IGNORE_INDEX), default=0)
    return ids[:end], labels[:end]


# ----------------------------------------------------------------------------------------------------
# whole data sets


@dataclass
class EncodeStats:
    """What encoding did to a data set, printed at start-up."""

    examples: int = 0
    history_truncated: int = 0     # conversations that lost their oldest turns (or prompt tokens)
    response_truncated: int = 0    # single responses cut at max_length
    skipped: int = 0               # no learnable token left

    def kept(self, history_cut: bool, response_cut: bool) -> None:
        """Count one encoded example and what truncation did to it."""
        self.history_truncated += history_cut
        self.response_truncated += response_cut
        self.examples += 1

    def summary(self) -> str:
        """e.g. '120 examples; 3 lost their oldest turns, 1 response cut at max length, 0 skipped (nothing
        to learn)'."""
        responses = "response" if self.response_truncated == 1 else "responses"
        return (f"{self.examples} examples; {self.history_truncated} lost their oldest turns, "
                f"{self.response_truncated} {responses} cut at max length, "
                f"{self.skipped} skipped (nothing to learn)")


def encode_conversations(tokenizer, conversations: list[list[dict]], max_length: int
                         ) -> tuple[list[dict], EncodeStats]:
    """[{"input_ids", "labels"}] for each conversation that has a learnable token, and the counts.

    A conversation longer than max_length tokens is shortened in this order, stopping once it fits:
    1. drop its oldest whole exchanges (user + assistant), keeping a leading system message;
    2. with only the last exchange left, drop the system message;
    3. cut tokens: the prompt (user turn and headers) keeps its end, at most
       max(max_length // 2, max_length - response length) tokens; the response is cut at its end.
    Steps 1, 2 and a cut prompt count as history_truncated, a cut response as response_truncated.
    Example, max_length fits one exchange: [system, u1, a1, u2, a2] -> [system, u2, a2].
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    stats, examples = EncodeStats(), []
    for messages in conversations:
        ids, labels, history_cut, response_cut = _fit_conversation(tokenizer, messages, max_length)
        if not _learns(labels):
            stats.skipped += 1
            continue
        stats.kept(history_cut, response_cut)
        examples.append({"input_ids": ids, "labels": labels})
    return examples, stats


def encode_preferences(tokenizer, preferences, max_length: int) -> tuple[list[dict], EncodeStats]:
    """[{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}] and the counts.

    `preferences` are objects with .prompt (messages ending with user), .chosen and .rejected (str);
    truncation as in render_preference. A pair where either side has no learnable token is skipped.
    """
    stats, examples = EncodeStats(), []
    for preference in preferences:
        chosen_ids, chosen_labels, rejected_ids, rejected_labels, prompt_cut, completion_cut = _fit_preference(
            tokenizer, preference.prompt, preference.chosen, preference.rejected, max_length)
        if not (_learns(chosen_labels) and _learns(rejected_labels)):
            stats.skipped += 1
            continue
        stats.kept(prompt_cut, completion_cut)
        examples.append({"chosen_ids": chosen_ids, "chosen_labels": chosen_labels,
                         "rejected_ids": rejected_ids, "rejected_labels": rejected_labels})
    return examples, stats


def encode_ratings(tokenizer, ratings, max_length: int) -> tuple[list[dict], EncodeStats]:
    """[{"input_ids", "labels", "prompt_length", "desirable"}] and the counts (KTO).

    `ratings` are objects with .prompt (messages ending with user), .completion (str) and .desirable (bool);
    each is its prompt's ids then the completion's, learned as in render_preference (and truncated as it
    says); prompt_length counts the prompt's tokens, where the completion starts (for the KL rows that join
    one example's prompt to another's completion, collate.mismatched_rows). A rating whose completion has
    no learnable token is skipped.
    """
    stats, examples = EncodeStats(), []
    for rating in ratings:
        (ids, labels), prompt_length, prompt_cut, completion_cut = _fit_completions(
            tokenizer, rating.prompt, (rating.completion,), max_length)
        if not _learns(labels):
            stats.skipped += 1
            continue
        stats.kept(prompt_cut, completion_cut)
        examples.append({"input_ids": ids, "labels": labels, "prompt_length": prompt_length,
                         "desirable": rating.desirable})
    return examples, stats


def _learns(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels)


def _fit_conversation(tokenizer, messages, max_length) -> tuple[list[int], list[int], bool, bool]:
    """(ids, labels, history_cut, response_cut): `messages` shortened to max_length as encode_conversations says."""
    ids, labels = render_conversation(tokenizer, messages)
    if len(ids) <= max_length:
        return ids, labels, False, False

    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    # The most recent exchanges that fit, by bisection over how many to keep (length grows with it):
    # keeping `fits` exchanges is known to fit (0: none known), keeping `misses` is known not to.
    fits, misses = 0, len(turns) // 2
    while misses - fits > 1:
        middle = (fits + misses) // 2
        if len(_render_ids(tokenizer, system + turns[-2 * middle:])) <= max_length:
            fits = middle
        else:
            misses = middle
    if fits:
        return (*render_conversation(tokenizer, system + turns[-2 * fits:]), True, False)

    last = turns[-2:]
    ids, labels = render_conversation(tokenizer, last)
    if len(ids) <= max_length:
        return ids, labels, True, False
    prompt = next((j for j, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    response = len(ids) - prompt
    keep_prompt = min(prompt, max(max_length // 2, max_length - response))
    keep_response = max_length - keep_prompt
    window = slice(prompt - keep_prompt, prompt + keep_response)
    history_cut = len(messages) > 2 or keep_prompt < prompt
    return ids[window], labels[window], history_cut, keep_response < response
