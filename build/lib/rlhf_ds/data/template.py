"""The one prompt-formatting function every stage uses.

'chat' renders the messages with the tokenizer's chat template and its generation prompt. 'plain' is for
tokenizers without one:

    {system}\\n\\n                       (only when there is a system message)
    Human: {user}\\nAssistant: {answer}\\n\\n   (each earlier turn)
    Human: {user}\\nAssistant:            (the turn to answer; the response follows after one space)

The response is always followed by the tokenizer's EOS token, so a model learns to stop.
"""
from __future__ import annotations

from rlhf_ds.errors import UserError


def resolve_template(tokenizer, template: str) -> str:
    """'auto' -> 'chat' if the tokenizer has a chat template, else 'plain'."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "plain"
    if template == "chat" and not has_chat:
        raise UserError("--template chat: this tokenizer has no chat template; use --template plain (or auto)")
    return template


def _plain(messages: list[dict[str, str]]) -> str:
    parts: list[str] = []
    turns = messages
    if turns and turns[0]["role"] == "system":
        parts.append(turns[0]["content"].strip() + "\n\n")
        turns = turns[1:]
    for m in turns:
        if m["role"] == "user":
            parts.append(f"Human: {m['content']}\nAssistant:")
        elif m["role"] == "assistant":
            parts.append(f" {m['content']}\n\n")
        else:
            raise ValueError(f"unexpected role {m['role']!r} after the first message")
    return "".join(parts) + " "


def render_prompt(tokenizer, messages: list[dict[str, str]], template: str) -> str:
    """The text a model sees before its answer. `template` must already be resolved ('chat' or 'plain')."""
    if template == "chat":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _plain(messages)
