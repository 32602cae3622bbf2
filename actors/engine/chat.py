"""Chat requests: messages rendered into prompt token ids with the checkpoint's own template."""

from __future__ import annotations

from specserve.actors.engine.request import InvalidRequestError

MAX_MESSAGES = 1024
MAX_CHAT_CHARS = 1_000_000  # all contents together, as for a text prompt


def check_messages(messages: list[dict]) -> None:
    """Refuse a chat that no template should see, naming the field (INVALID_ARGUMENT)."""
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError("messages", f"more than {MAX_MESSAGES} messages")
    for i, message in enumerate(messages):
        if not message.get("role"):
            raise InvalidRequestError(f"messages.{i}.role", "must not be empty")
    if sum(len(m.get("content") or "") for m in messages) > MAX_CHAT_CHARS:
        raise InvalidRequestError("messages", f"longer than {MAX_CHAT_CHARS} characters in all")


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt token ids of `messages` ([{"role", "content"}]) under the tokenizer's chat
    template, with the generation prompt added, exactly as transformers' apply_chat_template
    tokenizes them."""
    check_messages(messages)
    if tokenizer is None:
        raise InvalidRequestError("messages", "this model has no tokenizer; send prompt_token_ids")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("messages", "the served checkpoint has no chat template; send prompt text")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # the template's own raise_exception (e.g. roles must alternate)
        raise InvalidRequestError("messages", f"the chat template refused them: {e}") from None
    # the template writes the special tokens it wants (BOS included) as text
    return tokenizer.encode(text, add_special_tokens=False)
