"""Chat formats: the named chat templates (--chat-template), and a tokenizer made ready to render and pad.

Two renderings exist, picked by the tokenizer alone (data.encode): with a chat template, the text is
what `apply_chat_template` renders; without one (GPT-2, DialoGPT), every turn is its content
followed by EOS.
"""

from __future__ import annotations

DIALOGPT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] + eos_token }}{% endfor %}"
)

# "user: hi\nassistant: hello<EOS>\n": the plain-text chat format of GPT-2 chat models. The space
# before each content belongs to the content, so the generation prompt ends "assistant:" and a reply
# starts with " Sure" exactly as in training; the EOS closing each assistant turn teaches the bot to stop.
USER_ASSISTANT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)

# --chat-template NAME; anything else is a Jinja template file.
CHAT_TEMPLATE_NAMES = ("model", "dialogpt", "user-assistant")


def prepare_tokenizer(tokenizer):
    """Set pad = EOS when the tokenizer has no pad token; return it. The chat template is left alone.

    Padding is then known from the attention mask only, never by comparing ids with EOS: the EOS
    that ends a response stays a learned token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def set_chat_template(tokenizer, choice: str | None):
    """Apply `--chat-template`; return the tokenizer.

    None or "model": the tokenizer's own template (none: the DialoGPT path). "dialogpt": the DialoGPT
    path even when the tokenizer has a template. "user-assistant": USER_ASSISTANT_CHAT_TEMPLATE.
    Anything else is the path of a Jinja template file.
    """
    if choice in (None, "model"):
        return tokenizer
    if choice == "dialogpt":
        tokenizer.chat_template = None
    elif choice == "user-assistant":
        tokenizer.chat_template = USER_ASSISTANT_CHAT_TEMPLATE
    else:
        with open(choice, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    return tokenizer


def uses_chat_template(tokenizer) -> bool:
    """True when the tokenizer renders with its own chat template; False selects the DialoGPT path."""
    return bool(getattr(tokenizer, "chat_template", None))
