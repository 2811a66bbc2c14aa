"""A tiny ChatGLM-6B folder in the published layout, made in seconds with nothing downloaded: for tests and trials.

`train_ice_text` trains a SentencePiece model on the shipped data and lays its pieces out as the published
ice_text.model does, scaled down: `text_vocab` text pieces (published: 130000) with <unk> <s> </s> <pad> <n> ▁ first,
then [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>, <|tab|>, <|blank_2|>..<|blank_80|> and the 256
byte pieces, so every special id is the published one minus (130000 - text_vocab).

`make_tiny_chatglm` writes config.json (the published fields, `auto_map` included), tokenizer_config.json (as
published), ice_text.model and random weights under the original parameter names (each layer's
rotary_emb.inv_freq included) as pytorch_model-0000k-of-0000n.bin shards with pytorch_model.bin.index.json, or as
model.safetensors.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

PUBLISHED_TEXT_VOCAB = 130000
SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]


def whitespace_pieces() -> list[str]:
    from rlhf_ds.models.chatglm.tokenization import MAX_BLANK_LENGTH, TAB_TOKEN, blank_token

    return [TAB_TOKEN] + [blank_token(n) for n in range(2, MAX_BLANK_LENGTH + 1)]


def special_ids(text_vocab: int) -> dict[str, int]:
    """The config's special-token ids for a tokenizer with `text_vocab` text pieces (published: 130000)."""
    return {"mask_token_id": text_vocab, "gmask_token_id": text_vocab + 1, "bos_token_id": text_vocab + 4,
            "eos_token_id": text_vocab + 5, "pad_token_id": 3}


def train_ice_text(out_path: Path, text_vocab: int = 3000) -> Path:
    """A SentencePiece unigram model trained on the shipped Chinese and English data, in ice_text.model's layout."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    from rlhf_ds.models.chatglm.tokenization import LINEBREAK_TOKEN, preprocess
    from rlhf_ds.models.tiny import corpus

    user_defined = [LINEBREAK_TOKEN] + whitespace_pieces()
    texts = [preprocess(t) for t in corpus() if t.strip()]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prefix = out_path.parent / (out_path.stem + ".raw")
    # normal pieces wanted: text_vocab - 5 (ids 5..text_vocab-1); the trainer counts 4 meta, 81 user-defined and
    # 256 byte pieces as well
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), model_type="unigram",
        vocab_size=text_vocab - 5 + 4 + len(user_defined) + 256, user_defined_symbols=user_defined,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, byte_fallback=True, split_digits=True,
        character_coverage=0.9995, normalization_rule_name="nmt_nfkc", num_threads=1, minloglevel=2,
        max_sentence_length=16384)
    model = pb.ModelProto()
    model.ParseFromString(Path(f"{prefix}.model").read_bytes())
    pieces = list(model.pieces)
    by_name = {p.piece: p for p in pieces}
    Type = pb.ModelProto.SentencePiece.Type
    normal = [p for p in pieces if p.type == Type.NORMAL]
    space = by_name.get("▁")
    if space is not None:  # the published model has "▁" (the dummy prefix alone) right after <n>
        normal = [space] + [p for p in normal if p is not space]
    if len(normal) != text_vocab - 5:
        raise RuntimeError(f"trained {len(normal)} text pieces, wanted {text_vocab - 5}; lower text_vocab")

    def control(name: str):
        piece = pb.ModelProto.SentencePiece()
        piece.piece, piece.score, piece.type = name, 0.0, Type.CONTROL
        return piece

    layout = ([by_name["<unk>"], by_name["<s>"], by_name["</s>"], by_name["<pad>"], by_name[LINEBREAK_TOKEN]] + normal
              + [control(s) for s in SPECIALS] + [by_name[w] for w in whitespace_pieces()]
              + [by_name[f"<0x{b:02X}>"] for b in range(256)])
    copies = [pb.ModelProto.SentencePiece() for _ in layout]
    for new, old in zip(copies, layout):
        new.CopyFrom(old)
    del model.pieces[:]
    model.pieces.extend(copies)
    model.trainer_spec.vocab_size = len(copies)
    out_path.write_bytes(model.SerializeToString())
    for suffix in (".model", ".vocab"):
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)
    return out_path


def tokenizer_config(num_image_tokens: int = 0) -> dict:
    """tokenizer_config.json as published (the `auto_map` to remote code included)."""
    return {"name_or_path": "THUDM/chatglm-6b", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
            "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
            "remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer",
            "num_image_tokens": num_image_tokens,
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}


def published_config(text_vocab: int = PUBLISHED_TEXT_VOCAB, **sizes) -> dict:
    """config.json in the published format; the published values unless `sizes` / `text_vocab` say otherwise."""
    config = {
        "_name_or_path": "THUDM/chatglm-6b", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        **special_ids(text_vocab), "hidden_size": 4096, "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05,
        "max_sequence_length": 2048, "model_type": "chatglm", "num_attention_heads": 32, "num_layers": 28,
        "position_encoding_2d": True, "torch_dtype": "float16", "transformers_version": "4.23.1",
        "use_cache": True, "vocab_size": 130528}
    config.update(sizes)
    return config


def make_tiny_chatglm(out_dir: Path, ice_text: Path | None = None, text_vocab: int = 3000, layers: int = 2,
                      hidden: int = 64, heads: int = 4, inner: int = 128, max_sequence_length: int = 1024,
                      seed: int = 0, shards: int = 2, safetensors: bool = False, dtype=None,
                      **config_overrides) -> Path:
    """A random chatglm-6b-format folder; `ice_text` reuses a trained ice_text.model (text_vocab must match)."""
    import torch

    from rlhf_ds.models.chatglm.configuration import ChatGLMConfig
    from rlhf_ds.models.chatglm.modeling import ChatGLMForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ice_text is None:
        train_ice_text(out_dir / "ice_text.model", text_vocab)
    elif Path(ice_text).resolve() != (out_dir / "ice_text.model").resolve():
        shutil.copy(ice_text, out_dir / "ice_text.model")
    pieces = text_vocab + len(SPECIALS) + len(whitespace_pieces()) + 256
    vocab_size = -(-pieces // 64) * 64  # the model has more rows than the tokenizer has pieces, as published
    dtype = dtype or torch.float32
    config = published_config(text_vocab, hidden_size=hidden, inner_hidden_size=inner, num_attention_heads=heads,
                              num_layers=layers, max_sequence_length=max_sequence_length, vocab_size=vocab_size,
                              torch_dtype=str(dtype).replace("torch.", ""), **config_overrides)
    torch.manual_seed(seed)
    model_config = ChatGLMConfig(**{k: v for k, v in config.items() if k not in ("_name_or_path", "architectures")})
    model = ChatGLMForConditionalGeneration(model_config).to(dtype)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    rot_dim = hidden // heads // (2 if config["position_encoding_2d"] else 1)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))).half()
    for i in range(layers):
        state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return out_dir
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    weight_map, total = {}, 0
    for k, group in enumerate(groups, start=1):
        file = f"pytorch_model-{k:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in group}, out_dir / file)
        for n in group:
            weight_map[n] = file
            total += state[n].numel() * state[n].element_size()
    (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return out_dir
