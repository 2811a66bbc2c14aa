"""One prompt format for every stage: the chat template when there is one, a documented plain one otherwise."""
import pytest
from transformers import AutoTokenizer

from rlhf_ds.data.loading import tokenize_preference, tokenize_sft
from rlhf_ds.data.template import render_prompt, resolve_template
from rlhf_ds.errors import UserError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]


def test_auto_picks_chat_template_when_present(tokenizer_dir, plain_tokenizer_dir):
    assert resolve_template(AutoTokenizer.from_pretrained(tokenizer_dir), "auto") == "chat"
    plain = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    assert resolve_template(plain, "auto") == "plain"
    with pytest.raises(UserError, match="no chat template"):
        resolve_template(plain, "chat")


def test_chat_and_plain_renderings(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert render_prompt(tok, MESSAGES, "chat") == (
        "<|system|>Be brief.</s><|user|>Hi</s><|assistant|>Hello</s><|user|>2+2?</s><|assistant|>")
    assert render_prompt(tok, MESSAGES, "plain") == "Be brief.\n\nHuman: Hi\nAssistant: Hello\n\nHuman: 2+2?\nAssistant: "


def test_every_answer_ends_with_eos_and_prompt_length_is_recorded(tokenizer_dir):
    import datasets

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pref = datasets.Dataset.from_list([{"prompt": MESSAGES, "chosen": "4", "rejected": "five"}])
    row = tokenize_preference(pref, tok, "chat", 512)[0]
    prompt_ids = tok(render_prompt(tok, MESSAGES, "chat"), add_special_tokens=False)["input_ids"]
    assert row["chosen_ids"][: len(prompt_ids)] == prompt_ids and row["chosen_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["rejected_ids"][len(prompt_ids):-1]) == "five"
    sft = datasets.Dataset.from_list([{"prompt": MESSAGES, "response": "4"}])
    srow = tokenize_sft(sft, tok, "chat", 512)[0]
    assert srow["prompt_len"] == len(prompt_ids) and srow["input_ids"][-1] == tok.eos_token_id
