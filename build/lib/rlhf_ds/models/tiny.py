"""Randomly initialised models built from configs, and a byte-level BPE tokenizer trained on the shipped data:
made in seconds with nothing downloaded. The tests and the benchmarks use them; so can anyone trying a change."""
from __future__ import annotations

import json
from pathlib import Path

from rlhf_ds.args import DEFAULT_DATASET_DIR

DATA = Path(DEFAULT_DATASET_DIR)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus() -> list[str]:
    texts: list[str] = []
    for name in ("comparison_gpt4_data_en.partial.json", "comparison_gpt4_data_zh.partial.json",
                 "alpaca_gpt4_data_zh.subset.json"):
        for rec in json.loads((DATA / name).read_text(encoding="utf-8")):
            texts.append(rec["instruction"] + "\n" + rec.get("input", ""))
            outs = rec["output"] if isinstance(rec["output"], list) else [rec["output"]]
            texts.extend(outs)
    return texts


def train_tokenizer(out_dir: Path, vocab_size: int = 2000, chat: bool = True):
    """A byte-level BPE tokenizer saved as a Hugging Face folder (pad <pad>=0, bos <s>=1, eos </s>=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=SPECIALS[4:], padding_side="left")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def make_model(out_dir: Path, tokenizer_dir: Path, arch: str = "llama", seed: int = 0, hidden: int = 64,
               layers: int = 2, heads: int = 4, ffn: int | None = None, max_positions: int = 1024,
               dtype=None) -> Path:
    """A randomly initialised causal LM of the given architecture, saved with the tokenizer beside it."""
    import shutil

    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn or 2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                             max_position_embeddings=max_positions, tie_word_embeddings=False, **ids)
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":  # learned absolute positions: sensitive to wrong position ids under left padding
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, **ids)
        model = GPT2LMHeadModel(config)
    elif arch == "opt":  # LayerNorm, ReLU MLP, learned positions with OPT's offset of 2
        from transformers import OPTConfig, OPTForCausalLM

        config = OPTConfig(hidden_size=hidden, ffn_dim=ffn or 4 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, max_position_embeddings=max_positions,
                           word_embed_proj_dim=hidden, **ids)
        model = OPTForCausalLM(config)
    else:
        raise ValueError(arch)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(out_dir))
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out_dir / f.name)
    return out_dir
