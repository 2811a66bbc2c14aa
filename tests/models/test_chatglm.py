"""The native ChatGLM-6B: a folder in the published format loads through the Auto classes without remote code; the
architecture's known properties (prefix-LM mask, 2-D position ids under padding, the scaled residual, the per-head
query_key_value split, the layer-scaled attention); forward, loss, cached and uncached generation, save and reload,
LoRA, gradient checkpointing, the rotary numerics; the tokenizer's layout, round trip and chat format; the training
rows; GLM-4 through transformers' own glm / glm4 classes; the SFT, export and chat command lines, and the RM and PPO
(from the SFT adapter) command lines on two processes under ZeRO-3, and the hybrid engine. Tiny random models in
the published config.json format, a SentencePiece model trained on the shipped data in ice_text.model's layout;
nothing is downloaded."""
import json
import math
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from conftest import REPO, check_ok, child_env, read_jsonl, run_cli, run_tree, zero3_test_config

from rlhf_ds.errors import UserError
from rlhf_ds.models.chatglm import tiny as glm_tiny

TEXT_VOCAB = 3000  # the published tokenizer has 130000 text pieces; every special id shifts by the difference
SHIFT = glm_tiny.PUBLISHED_TEXT_VOCAB - TEXT_VOCAB
MASK, GMASK, SOP, EOP, PAD = 130000 - SHIFT, 130001 - SHIFT, 130004 - SHIFT, 130005 - SHIFT, 3


@pytest.fixture(scope="session")
def ice_text(artifacts) -> Path:
    return glm_tiny.train_ice_text(artifacts / "chatglm-ice" / "ice_text.model", TEXT_VOCAB)


@pytest.fixture(scope="session")
def tiny_glm(artifacts, ice_text) -> Path:
    """Published layout: config.json and tokenizer_config.json with their auto_map, two .bin shards + index."""
    return glm_tiny.make_tiny_chatglm(artifacts / "tiny-chatglm", ice_text, TEXT_VOCAB)


def load_lm(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def load_tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def prompt_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------ the published layout

def published_weight_names(layers: int) -> set[str]:
    """The keys of the published pytorch_model.bin.index.json (THUDM/chatglm-6b)."""
    per_layer = ["attention.dense.bias", "attention.dense.weight", "attention.query_key_value.bias",
                 "attention.query_key_value.weight", "attention.rotary_emb.inv_freq", "input_layernorm.bias",
                 "input_layernorm.weight", "mlp.dense_4h_to_h.bias", "mlp.dense_4h_to_h.weight",
                 "mlp.dense_h_to_4h.bias", "mlp.dense_h_to_4h.weight", "post_attention_layernorm.bias",
                 "post_attention_layernorm.weight"]
    names = {f"transformer.layers.{i}.{n}" for i in range(layers) for n in per_layer}
    return names | {"lm_head.weight", "transformer.final_layernorm.bias", "transformer.final_layernorm.weight",
                    "transformer.word_embeddings.weight"}


def test_full_size_model_has_the_published_parameter_names_and_shapes():
    from rlhf_ds.models.chatglm.configuration import ChatGLMConfig
    from rlhf_ds.models.chatglm.modeling import ChatGLMForConditionalGeneration

    config = ChatGLMConfig(**{k: v for k, v in glm_tiny.published_config().items()
                              if k not in ("_name_or_path", "architectures")})
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    inv_freq = {f"transformer.layers.{i}.attention.rotary_emb.inv_freq" for i in range(28)}
    assert set(shapes) | inv_freq == published_weight_names(28)
    assert shapes["transformer.layers.0.attention.query_key_value.weight"] == (3 * 4096, 4096)
    assert shapes["transformer.layers.0.attention.dense.weight"] == (4096, 4096)
    assert shapes["transformer.layers.0.mlp.dense_h_to_4h.weight"] == (16384, 4096)
    assert shapes["transformer.layers.27.mlp.dense_4h_to_h.weight"] == (4096, 16384)
    assert shapes["transformer.word_embeddings.weight"] == shapes["lm_head.weight"] == (130528, 4096)
    assert model.lm_head.weight is not model.transformer.word_embeddings.weight  # two tensors, as stored
    assert config.num_hidden_layers == 28 and config.max_position_embeddings == 2048


def test_published_folder_loads_through_the_auto_classes_without_remote_code(tiny_glm, tmp_path):
    from transformers import AutoConfig, AutoModel

    from rlhf_ds.models.chatglm.modeling import ChatGLMForConditionalGeneration, ChatGLMModel
    from rlhf_ds.models.chatglm.tokenization import ChatGLMTokenizer

    assert "auto_map" in json.loads((tiny_glm / "config.json").read_text())
    assert "auto_map" in json.loads((tiny_glm / "tokenizer_config.json").read_text())
    # a published folder also carries the remote code its auto_map names: here each file fails if it is imported
    folder = tmp_path / "published"
    shutil.copytree(tiny_glm, folder)
    for name in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py"):
        (folder / name).write_text(f"raise RuntimeError('remote code {name} was executed')\n")
    config = AutoConfig.from_pretrained(str(folder))
    assert config.model_type == "chatglm" and not hasattr(config, "auto_map")
    lm = load_lm(folder)
    backbone = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
    assert type(lm) is ChatGLMForConditionalGeneration and type(backbone) is ChatGLMModel
    assert isinstance(load_tok(folder), ChatGLMTokenizer)
    stored = {}
    for shard in sorted(tiny_glm.glob("pytorch_model-*.bin")):
        stored.update(torch.load(shard, weights_only=True))
    for name, tensor in lm.state_dict().items():  # every weight from the shards, under its published name
        assert torch.equal(tensor, stored[name]), name
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, stored["transformer." + name]), name

    # safetensors and fp16 weights (the published dtype) load the same way
    st = glm_tiny.make_tiny_chatglm(tmp_path / "st", tiny_glm / "ice_text.model", TEXT_VOCAB, safetensors=True,
                                    dtype=torch.float16)
    half = load_lm(st, dtype=torch.float16)
    assert half.lm_head.weight.dtype == torch.float16
    ids = torch.tensor([prompt_ids(load_tok(st), "请介绍一下清华大学的历史。")])
    with torch.no_grad():  # fp16 and bf16 (what --fp16 runs as on a CPU) agree with fp32
        full = load_lm(st, dtype=torch.float32)(ids).logits
        torch.testing.assert_close(half(ids).logits.float(), full, atol=5e-3, rtol=0)
        bf16 = load_lm(st, dtype=torch.bfloat16)
        assert bf16.lm_head.weight.dtype == torch.bfloat16
        torch.testing.assert_close(bf16(ids).logits.float(), full, atol=3e-2, rtol=0)


def test_importing_rlhf_ds_models_is_enough_and_stays_light(tiny_glm, tmp_path):
    """In a fresh process: the tokenizer loads first from a folder without config.json (as a LoRA adapter folder
    is, with the published tokenizer_config.json and its auto_map), then the model; the modeling code is imported
    only when a ChatGLM model is met."""
    adapter_like = tmp_path / "tokenizer-only"
    adapter_like.mkdir()
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(tiny_glm / name, adapter_like / name)
    code = (
        "import sys, rlhf_ds.models\n"
        "light = 'rlhf_ds.models.chatglm.modeling' not in sys.modules\n"
        "from transformers import AutoTokenizer, AutoModelForCausalLM\n"
        f"tok = AutoTokenizer.from_pretrained({str(adapter_like)!r})\n"
        "still_light = 'rlhf_ds.models.chatglm.modeling' not in sys.modules\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tiny_glm)!r})\n"
        "print(light, still_light, type(tok).__name__, type(model).__name__)\n")
    proc = check_ok(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                   cwd=str(REPO)))
    assert proc.stdout.split() == ["True", "True", "ChatGLMTokenizer", "ChatGLMForConditionalGeneration"]


def test_unsupported_variants_stop_with_one_clear_line(tiny_glm, tmp_path):
    for key, value, words in (("pre_seq_len", 128, "P-tuning v2"), ("quantization_bit", 4, "quantized"),
                              ("multi_query_attention", True, "ChatGLM2-6B / ChatGLM3-6B"),
                              ("eva_config", {"num_layers": 39}, "VisualGLM-6B")):
        folder = tmp_path / key
        shutil.copytree(tiny_glm, folder)
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(UserError, match=words) as err:
            load_lm(folder)
        assert "\n" not in str(err.value) and f"{folder}/config.json" in str(err.value)
    no_vocab = tmp_path / "no-ice-text"  # a ChatGLM2/3 folder has tokenizer.model instead
    shutil.copytree(tiny_glm, no_vocab)
    (no_vocab / "ice_text.model").unlink()
    with pytest.raises(UserError, match="ice_text.model"):
        load_tok(no_vocab)


# --------------------------------------------------------------------- positions, the mask, the residual

def small_config(**kw):
    from rlhf_ds.models.chatglm.configuration import ChatGLMConfig

    base = dict(vocab_size=64, hidden_size=32, num_layers=3, num_attention_heads=4, inner_hidden_size=48,
                mask_token_id=50, gmask_token_id=51, bos_token_id=54, eos_token_id=55, pad_token_id=3)
    return ChatGLMConfig(**{**base, **kw})


def test_position_and_block_position_ids_around_gmask_and_sop_under_padding():
    from rlhf_ds.models.chatglm.modeling import glm_position_ids

    config = small_config()
    a, b, c, x, y = 10, 11, 12, 20, 21
    row = [a, b, c, 51, 54, x, y]  # "a b c [gMASK] <sop> x y"
    expected = [[0, 1, 2, 3, 3, 3, 3], [0, 0, 0, 0, 1, 2, 3]]
    assert glm_position_ids(torch.tensor([row]), None, config)[0].tolist() == expected
    # left padding, right padding, both: the real tokens get the unpadded ids; pads 0
    batch = torch.tensor([[3, 3] + row, row + [3, 3], [3] + row + [3]])
    mask = (batch != 3).long()
    got = glm_position_ids(batch, mask, config)
    assert got[0, :, 2:].tolist() == expected and got[0, :, :2].tolist() == [[0, 0], [0, 0]]
    assert got[1, :, :7].tolist() == expected
    assert got[2, :, 1:8].tolist() == expected
    # [MASK] instead of [gMASK]: the answer's positions stay at the mask's position too (2-D encoding)
    masked = torch.tensor([[a, 50, b, 54, x, y]])
    assert glm_position_ids(masked, None, config)[0].tolist() == [[0, 1, 2, 1, 1, 1], [0, 0, 0, 1, 2, 3]]
    # 1-D encoding: after [gMASK] positions keep counting, after [MASK] they stay at the mask
    flat = small_config(position_encoding_2d=False)
    assert glm_position_ids(torch.tensor([row]), None, flat)[0, 0].tolist() == list(range(7))
    assert glm_position_ids(masked, None, flat)[0, 0].tolist() == [0, 1, 2, 1, 1, 1]
    # a <sop> or [gMASK] inside the answer does not move anything; no <sop> at all: everything is context
    again = torch.tensor([row + [51, 54, x]])
    assert glm_position_ids(again, None, config)[0].tolist() == [[0, 1, 2, 3, 3, 3, 3, 3, 3, 3],
                                                                 [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]]
    assert glm_position_ids(torch.tensor([[a, b, 51, x]]), None, config)[0].tolist() == [[0, 1, 2, 3], [0] * 4]


def test_attention_is_bidirectional_over_the_prompt_and_causal_over_the_answer():
    from rlhf_ds.models.chatglm.modeling import ChatGLMModel, glm_position_ids, prefix_lm_mask

    config = small_config()
    ids = torch.tensor([[10, 11, 12, 51, 54, 20, 21, 22]])
    context = 4  # the tokens before <sop>
    allowed = prefix_lm_mask(torch.ones_like(ids, dtype=torch.bool),
                             glm_position_ids(ids, None, config)[:, 1] == 0, 0)[0, 0]
    # the published rule: lower triangle, plus every column of the context
    expected = [[j <= i or j < context for j in range(8)] for i in range(8)]
    assert allowed.tolist() == expected

    torch.manual_seed(0)
    model = ChatGLMModel(config).eval()
    with torch.no_grad():
        base = model(ids).last_hidden_state
        later_prompt = ids.clone()
        later_prompt[0, 2] = 30  # changes what the first prompt tokens see
        changed = model(later_prompt).last_hidden_state
        assert (changed[0, :2] - base[0, :2]).abs().max() > 1e-4
        later_answer = ids.clone()
        later_answer[0, 6] = 31  # an answer token: nothing before it sees it
        changed = model(later_answer).last_hidden_state
        torch.testing.assert_close(changed[0, :6], base[0, :6], atol=0, rtol=0)
        assert (changed[0, 6:] - base[0, 6:]).abs().max() > 1e-4
        # pads are seen by nobody: same states for the real tokens with and without padding, left and right
        left = model(torch.cat([torch.full((1, 3), 3), ids], 1),
                     attention_mask=torch.tensor([[0] * 3 + [1] * 8])).last_hidden_state
        right = model(torch.cat([ids, torch.full((1, 2), 3)], 1),
                      attention_mask=torch.tensor([[1] * 8 + [0] * 2])).last_hidden_state
        torch.testing.assert_close(left[:, 3:], base, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(right[:, :8], base, atol=1e-5, rtol=1e-5)


def reference_block(block, x, positions, allowed, layer_idx):
    """One GLM block written out from the published description, head by head, sequence-first."""
    hidden = x.shape[-1]
    heads = block.attention.num_heads
    hn = hidden // heads
    h = torch.nn.functional.layer_norm(x, (hidden,), block.input_layernorm.weight, block.input_layernorm.bias,
                                       block.input_layernorm.eps)
    mixed = h @ block.attention.query_key_value.weight.T + block.attention.query_key_value.bias  # [T, 3H]
    inv_freq = (1.0 / (10000 ** (torch.arange(0, hn // 2, 2).float() / (hn // 2)))).half().float()

    def rope(v, pos):  # rotate-half over hn/2 dims
        angle = pos.float()[:, None] * inv_freq
        cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
        v1, v2 = v[:, : hn // 4], v[:, hn // 4:]
        return v * cos + torch.cat([-v2, v1], -1) * sin

    outs = []
    for head in range(heads):
        part = mixed[:, head * 3 * hn:(head + 1) * 3 * hn]  # this head's [q | k | v]
        q, k, v = part[:, :hn], part[:, hn:2 * hn], part[:, 2 * hn:]
        q = torch.cat([rope(q[:, :hn // 2], positions[0]), rope(q[:, hn // 2:], positions[1])], -1)
        k = torch.cat([rope(k[:, :hn // 2], positions[0]), rope(k[:, hn // 2:], positions[1])], -1)
        coeff = layer_idx + 1
        scores = (q / (math.sqrt(hn) * coeff)) @ k.T
        scores = scores.masked_fill(~allowed, -10000.0) * coeff
        outs.append(torch.softmax(scores, -1) @ v)
    attn = torch.cat(outs, -1) @ block.attention.dense.weight.T + block.attention.dense.bias
    alpha = math.sqrt(2 * 28)  # GLMBlock's default num_layers, which the published ChatGLMModel never passes
    mid = h * alpha + attn
    m = torch.nn.functional.layer_norm(mid, (hidden,), block.post_attention_layernorm.weight,
                                       block.post_attention_layernorm.bias, block.post_attention_layernorm.eps)
    ffn = torch.nn.functional.gelu(m @ block.mlp.dense_h_to_4h.weight.T + block.mlp.dense_h_to_4h.bias,
                                   approximate="tanh") @ block.mlp.dense_4h_to_h.weight.T + block.mlp.dense_4h_to_h.bias
    return m * alpha + ffn


def test_glm_block_matches_the_published_formulas_scaled_residual_included():
    from rlhf_ds.models.chatglm.modeling import ChatGLMModel, glm_position_ids, prefix_lm_mask

    config = small_config()
    torch.manual_seed(1)
    model = ChatGLMModel(config).eval()
    for p in model.parameters():  # LayerNorm affine parameters too, so nothing is trivially 1 or 0
        torch.nn.init.normal_(p, std=0.3)
    ids = torch.tensor([[10, 11, 12, 51, 54, 20, 21]])
    positions = glm_position_ids(ids, None, config)
    allowed = prefix_lm_mask(torch.ones_like(ids, dtype=torch.bool), positions[:, 1] == 0, 0)
    x = torch.randn(1, 7, 32)
    layer_idx = 2  # the layer number scales the attention scores (query_key_layer_scaling)
    block = model.layers[layer_idx]
    assert config.num_layers == 3 and block.alpha == pytest.approx(math.sqrt(56))  # the published scale at any depth
    with torch.no_grad():
        ours = block(x, position_ids=positions, attention_mask=allowed)
        ref = reference_block(block, x[0], positions[0], allowed[0, 0], layer_idx)
    torch.testing.assert_close(ours[0], ref, atol=1e-4, rtol=1e-4)


def test_rotary_tables_have_the_published_numerics_in_fp32_and_fp16():
    """The published RotaryEmbedding: inv_freq = 1 / 10000^(2i/d) rounded to fp16; angles t * inv_freq in the
    buffer's dtype (fp16 for an fp16 model: up to 0.5 rad from the exact angle at position 2047, so it matters)."""
    from rlhf_ds.models.chatglm.modeling import rotary_cos_sin

    dim, positions = 32, torch.arange(2048)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).half()
    for dtype in (torch.float32, torch.float16):
        t = positions.to(dtype)
        freqs = torch.einsum("i,j->ij", t, inv_freq.to(dtype))
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = rotary_cos_sin(positions[None], dim, dtype)
        assert cos.dtype == sin.dtype == dtype and cos.shape == (1, 1, 2048, dim)
        assert torch.equal(cos[0, 0], emb.cos()) and torch.equal(sin[0, 0], emb.sin()), dtype
    cos16 = rotary_cos_sin(positions[None], dim, torch.float16)[0].float()
    cos32 = rotary_cos_sin(positions[None], dim, torch.float32)[0]
    assert (cos16 - cos32).abs().max() > 0.1  # the two dtypes really differ: the test can tell them apart


# ----------------------------------------------------------------------------- forward, loss, generation

def test_forward_loss_and_logits_to_keep_with_generic_padding_inputs(tiny_glm):
    from rlhf_ds.algo.sequence import pad_sequences, position_ids_from_mask

    model, tok = load_lm(tiny_glm), load_tok(tiny_glm)
    rows = [prompt_ids(tok, q) + tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for q, a in (("你好", "你好，我是助手。"), ("中国的首都是哪里？", "北京"))]
    with torch.no_grad():
        alone = [model(torch.tensor([r])).logits[0] for r in rows]
        for side in ("left", "right"):
            ids, mask = pad_sequences(rows, tok.pad_token_id, side)
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        use_cache=False)  # what rlhf_ds's callers pass
            for b, r in enumerate(rows):
                real = out.logits[b][mask[b].bool()]
                torch.testing.assert_close(real, alone[b], atol=1e-4, rtol=1e-4)
        ids, mask = pad_sequences(rows, tok.pad_token_id, "left")
        kept = model(input_ids=ids, attention_mask=mask, logits_to_keep=4).logits
        torch.testing.assert_close(kept, model(input_ids=ids, attention_mask=mask).logits[:, -4:])
        labels = torch.tensor([rows[0]])
        loss = model(input_ids=labels, labels=labels).loss
        logits = alone[0][:-1]
        assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels[0, 1:]).item(), 1e-5)
        assert abs(loss.item() - math.log(model.config.vocab_size)) < 1.0  # a random model: about ln(V)


def test_greedy_generation_is_the_same_with_and_without_the_cache_on_a_left_padded_batch(tiny_glm):
    from rlhf_ds.algo.sequence import pad_sequences

    model, tok = load_lm(tiny_glm), load_tok(tiny_glm)
    prompts = [prompt_ids(tok, q) for q in ("你好", "请介绍一下清华大学的历史。", "1+1=?")]
    ids, mask = pad_sequences(prompts, tok.pad_token_id, "left")
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **settings)
        plain = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **settings)
        assert torch.equal(cached, plain)
        for b, p in enumerate(prompts):  # each row as if alone
            single = model.generate(input_ids=torch.tensor([p]), use_cache=True, **settings)
            assert cached[b, ids.shape[1]:].tolist() == single[0, len(p):].tolist()
        # the new tokens continue the answer: positions stay at [gMASK], block positions count on
        seq = cached[:1, ids.shape[1] - len(prompts[0]):]
        step = model.prepare_inputs_for_generation(seq, next_sequence_length=1,
                                                   attention_mask=torch.ones_like(seq))
        sop_at = len(prompts[0]) - 1
        assert step["position_ids"][0, :, -1].tolist() == [sop_at - 1, seq.shape[1] - sop_at]
    with pytest.raises(ValueError, match="<sop>"):
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2)


def test_save_and_reload_gives_the_same_model_and_tokenizer(tiny_glm, tmp_path):
    model, tok = load_lm(tiny_glm), load_tok(tiny_glm)
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "chatglm" and "auto_map" not in config
    assert "auto_map" not in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    again, tok2 = load_lm(tmp_path / "saved"), load_tok(tmp_path / "saved")
    ids = torch.tensor([prompt_ids(tok, "你好，世界")])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert prompt_ids(tok2, "你好，世界") == ids[0].tolist()
    assert tok2.chat_template == tok.chat_template and tok2.get_vocab() == tok.get_vocab()
    assert (tok2.eos_token_id, tok2.pad_token_id, tok2.padding_side) == (EOP, PAD, "left")


def test_lora_on_the_published_module_names_and_gradient_checkpointing(tiny_glm):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from rlhf_ds.args import FinetuningArguments
    from rlhf_ds.models.finetuning import apply_finetuning
    from rlhf_ds.models.heads import ScalarHeadModel

    tok = load_tok(tiny_glm)
    ids = torch.tensor([prompt_ids(tok, "你好") + tok("嗨", add_special_tokens=False)["input_ids"] + [EOP]])
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    model = get_peft_model(load_lm(tiny_glm), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         task_type="CAUSAL_LM"))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted == set(targets)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    assert all(g.abs().sum() > 0 for g in plain.values())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.base_model.model.transformer.layers[0].gradient_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)

    # the backbone under rlhf_ds's own LoRA setting ('all' = every linear layer) inside the scalar head
    backbone = AutoModel.from_pretrained(str(tiny_glm), dtype=torch.float32)
    scalar = ScalarHeadModel(apply_finetuning(backbone, FinetuningArguments(finetuning_type="lora")))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in scalar.named_parameters() if ".lora_A" in n}
    assert adapted == set(targets)
    mask = torch.ones_like(ids)
    assert scalar(ids, mask).shape == ids.shape and scalar.score(ids, mask).shape == (1,)


# ------------------------------------------------------------------------------------------- the tokenizer

def test_tokenizer_places_the_special_tokens_where_the_published_one_does(tiny_glm):
    from rlhf_ds.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_glm)  # as every stage loads it
    piece = tok.convert_ids_to_tokens
    assert len(tok) == tok.vocab_size == 130344 - SHIFT
    assert piece([0, 1, 2, 3, 4, 5]) == ["<unk>", "<s>", "</s>", "<pad>", "<n>", "▁"]
    assert piece(list(range(130000 - SHIFT, 130008 - SHIFT))) == ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>",
                                                                  "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
    assert piece([130008 - SHIFT, 130009 - SHIFT, 130087 - SHIFT]) == ["<|tab|>", "<|blank_2|>", "<|blank_80|>"]
    assert piece([130088 - SHIFT, 130343 - SHIFT]) == ["<0x00>", "<0xFF>"]
    assert (tok.mask_token_id, tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
            tok.unk_token_id) == (MASK, GMASK, SOP, EOP, PAD, 0)
    config = json.loads((tiny_glm / "config.json").read_text())
    assert (config["mask_token_id"], config["gmask_token_id"], config["bos_token_id"], config["eos_token_id"],
            config["pad_token_id"]) == (MASK, GMASK, SOP, EOP, PAD)
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"

    # encodings with the published structure (chatglm.cpp's vectors for the real model: "你好" -> 5, 74874,
    # 130001, 130004; "\n" -> 4; 👋 -> its four UTF-8 bytes as 130088 + byte)
    ids = tok("你好")["input_ids"]
    assert ids[0] == 5 and ids[-2:] == [GMASK, SOP]
    assert tok("a\nb", add_special_tokens=False)["input_ids"].count(4) == 1
    assert tok("a\tb  c", add_special_tokens=False)["input_ids"].count(130008 - SHIFT) == 1
    assert 130009 - SHIFT in tok("a\tb  c", add_special_tokens=False)["input_ids"]
    wave = tok("👋", add_special_tokens=False)["input_ids"]
    assert wave[-4:] == [130088 - SHIFT + b for b in "👋".encode()]
    # chatglm.cpp's code snippet: <n> 4, four spaces <|blank_4|> 130011, a tab <|tab|> 130008; and back
    code = "def main():\n    print('hello world')\t# greeting"
    ids = tok(code)["input_ids"]
    assert {4, 130011 - SHIFT, 130008 - SHIFT} <= set(ids) and ids[-2:] == [GMASK, SOP]
    assert tok.decode(ids, skip_special_tokens=True) == code
    assert tok.build_inputs_with_special_tokens([7, 8], [9]) == [7, 8, GMASK, SOP, 9, EOP]
    assert tok.decode([7, 8, GMASK, SOP, 9, EOP], skip_special_tokens=True) == tok.decode([7, 8, 9])
    assert tok.decode([tok.vocab_size + 5, PAD]) == ""  # the model's spare rows decode to nothing


def test_tokenizer_round_trips_chinese_text(tiny_glm):
    tok = load_tok(tiny_glm)
    texts = []
    for name in ("comparison_gpt4_data_zh.partial.json", "alpaca_gpt4_data_zh.subset.json"):
        for record in json.loads((REPO / "data" / name).read_text(encoding="utf-8"))[:150]:
            outputs = record["output"] if isinstance(record["output"], list) else [record["output"]]
            texts.extend([record["instruction"], *outputs])
    texts = [t for t in texts if t == t.strip() and "\u200b" not in t]
    assert len(texts) > 300
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        # SentencePiece's normaliser folds full-width punctuation (，：？) to ASCII, as the published model's output
        # shows (its chat() turns it back): otherwise the text comes back as it was, newlines and spaces included
        assert tok.decode(ids, clean_up_tokenization_spaces=False) == unicodedata.normalize("NFKC", text)
    plain = "晚上睡不着怎么办\n\n1. 保持规律的睡眠时间表:尽量在同一时间上床。\n    缩进\t制表"
    assert tok.decode(tok(plain)["input_ids"], skip_special_tokens=True) == plain


def test_chat_template_writes_the_published_chat_prompt(tiny_glm):
    from rlhf_ds.data.template import render_prompt, resolve_template

    tok = load_tok(tiny_glm)
    assert resolve_template(tok, "auto") == "chat"
    first = render_prompt(tok, [{"role": "user", "content": "你好"}], "chat")
    assert first == "你好[gMASK]<sop>"  # chat() without history: the bare query
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好👋！"},
               {"role": "user", "content": "晚上睡不着应该怎么办"}]
    text = render_prompt(tok, history, "chat")
    assert text == "[Round 0]\n问：你好\n答：你好👋！\n[Round 1]\n问：晚上睡不着应该怎么办\n答：[gMASK]<sop>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # the same ids as the published way: encode the prompt, then build_inputs_with_special_tokens appends the two
    prompt = text[: -len("[gMASK]<sop>")]
    assert ids == tok.build_inputs_with_special_tokens(tok(prompt, add_special_tokens=False)["input_ids"])
    closed = tok.apply_chat_template(history[:2], tokenize=False)
    assert closed == "你好[gMASK]<sop>你好👋！<eop>"


def test_training_rows_have_the_layout_of_the_published_finetuning(tiny_glm):
    """rlhf_ds's SFT and preference rows for ChatGLM are what ChatGLM-6B's own fine-tuning builds (ptuning/main.py):
    build_inputs_with_special_tokens(prompt ids, answer ids) = prompt [gMASK] <sop> answer <eop>, and only the answer
    and <eop> are trained."""
    import datasets

    from rlhf_ds.data.loading import tokenize_preference, tokenize_sft
    from rlhf_ds.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_glm)
    prompt, answer, worse = "中国的首都是哪里？", "北京。", "上海\n  是一座城市。"
    rows = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": prompt}], "response": answer}])
    row = tokenize_sft(rows, tok, "chat", max_length=128)[0]

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    published = tok.build_inputs_with_special_tokens(encode(prompt), encode(answer))
    assert row["input_ids"] == published and published[-1] == EOP
    assert row["input_ids"][row["prompt_len"] - 2: row["prompt_len"]] == [GMASK, SOP]  # the prompt ends at <sop>
    pairs = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": prompt}], "chosen": answer,
                                         "rejected": worse}])
    pair = tokenize_preference(pairs, tok, "chat", max_length=128)[0]
    assert pair["chosen_ids"] == published
    assert pair["rejected_ids"] == tok.build_inputs_with_special_tokens(encode(prompt), encode(worse))


@pytest.mark.parametrize("model_type", ["glm", "glm4"])
def test_glm4_runs_through_the_native_transformers_classes(tokenizer_dir, tmp_path, model_type):
    """GLM-4 needs nothing from this package: transformers' own glm (GLM-4-9B) and glm4 (GLM-4-0414) classes load
    behind the same boundary, as policy and as the backbone of a scalar head, with LoRA on their module names."""
    import transformers
    from transformers import AutoTokenizer

    from rlhf_ds.args import FinetuningArguments
    from rlhf_ds.models.finetuning import apply_finetuning
    from rlhf_ds.models.heads import ScalarHeadModel
    from rlhf_ds.models.loading import load_backbone, load_causal_lm

    prefix = {"glm": "Glm", "glm4": "Glm4"}[model_type]
    config_class, lm_class = getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = config_class(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path / model_type
    lm_class(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    model = load_causal_lm(folder, torch.float32).eval()
    assert type(model) is lm_class
    ids = torch.tensor([[5, 17, 99, 400]])
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, 7)
    lora = FinetuningArguments(finetuning_type="lora", lora_target="q_proj,v_proj,gate_up_proj")
    scalar = ScalarHeadModel(apply_finetuning(load_backbone(folder, torch.float32), lora))
    assert any(".gate_up_proj.lora_A" in n for n, _ in scalar.named_parameters())
    assert scalar.score(ids, torch.ones_like(ids)).shape == (1,)


# ------------------------------------------------------------------- the stages, 2 processes under ZeRO-3

GLM_LORA_TARGETS = "query_key_value,dense,dense_h_to_4h,dense_4h_to_h"


@pytest.fixture(scope="module")
def glm_sft(tiny_glm, tmp_path_factory) -> Path:
    """The recipe's SFT command on the chatglm folder: plain python, one process."""
    out = tmp_path_factory.mktemp("glm-sft") / "sft"
    check_ok(run_cli(
        "train_sft.py", "--model_name_or_path", str(tiny_glm), "--do_train", "--do_eval", "--val_size", "8",
        "--dataset", "alpaca_gpt4_zh", "--max_samples", "24", "--finetuning_type", "lora",
        "--lora_target", GLM_LORA_TARGETS, "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2", "--max_length", "96", "--fp16",
        "--disable_tqdm"))  # --fp16 as in the recipe's command: bf16 on a CPU
    return out


def test_sft_export_and_chat_through_the_command_lines(glm_sft, tiny_glm, forked_cli, tmp_path):
    rows = [r for r in read_jsonl(glm_sft / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    results = json.loads((glm_sft / "eval_results.json").read_text())
    assert results["eval_samples"] == 8 and math.isfinite(results["eval_perplexity"])
    adapter = json.loads((glm_sft / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(GLM_LORA_TARGETS.split(","))
    assert (glm_sft / "ice_text.model").exists()

    merged = tmp_path / "merged"
    check_ok(forked_cli.run("export.py", "--model_dir", str(glm_sft), "--output_dir", str(merged)))
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "chatglm" and "auto_map" not in config
    model, base, tok = load_lm(merged), load_lm(tiny_glm), load_tok(merged)
    ids = torch.tensor([prompt_ids(tok, "你好")])
    with torch.no_grad():  # the trained adapter is in the merged weights
        assert (model(ids).logits - base(ids).logits).abs().max() > 1e-4
    chat = check_ok(forked_cli.run("chat.py", "--model", str(glm_sft), "--prompt", "你好", "--max_new_tokens", "4"))
    assert "Traceback" not in chat.stderr


@pytest.fixture(scope="module")
def glm_rm(tiny_glm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("glm-rm") / "rm"
    cfg = zero3_test_config(out.parent / "zero3.json", offload=False)
    proc = check_ok(run_cli(
        "train_rm.py", "--model_name_or_path", str(tiny_glm), "--do_train", "--do_eval", "--val_size", "8",
        "--dataset", "comparison_gpt4_zh", "--max_samples", "40", "--finetuning_type", "lora",
        "--lora_target", "query_key_value,dense", "--output_dir", str(out), "--per_device_train_batch_size", "2",
        "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3", "--max_length", "96",
        "--deepspeed", str(cfg), "--disable_tqdm", nproc=2, launcher="deepspeed"))
    assert "ZeRO-3" in proc.stdout and "2 rank(s)" in proc.stdout
    return out


def test_reward_model_step_on_two_processes_under_zero3(glm_rm):
    rows = [r for r in read_jsonl(glm_rm / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    results = json.loads((glm_rm / "eval_results.json").read_text())
    assert results["eval_samples"] == 8 and math.isfinite(results["eval_score_mean"])
    assert (glm_rm / "adapter_model.safetensors").exists() and (glm_rm / "ice_text.model").exists()
    meta = json.loads((glm_rm / "value_head.json").read_text())
    assert meta["template"] == "chat"


def test_ppo_step_on_two_processes_under_zero3_with_the_hybrid_engine(tiny_glm, glm_sft, glm_rm, tmp_path):
    """The recipe's PPO command: the policy from the SFT stage's adapter, the critic from the reward model."""
    out = tmp_path / "ppo"
    proc = check_ok(run_cli(
        "train_ppo.py", "--model_name_or_path", str(tiny_glm), "--do_train", "--dataset", "alpaca_gpt4_zh",
        "--max_samples", "40", "--output_dir", str(out), "--checkpoint_dir", str(glm_sft),
        "--reward_model", str(glm_rm), "--finetuning_type", "lora",
        "--actor_zero_stage", "3", "--critic_zero_stage", "3", "--stage3_param_persistence_threshold", "0",
        "--actor_gradient_checkpointing", "--per_device_train_batch_size", "2", "--max_steps", "1",
        "--max_new_tokens", "8", "--max_prompt_length", "48", "--logging_steps", "1", "--learning_rate", "1e-3",
        "--save_steps", "0", "--disable_tqdm", nproc=2, launcher="deepspeed"))
    assert "actor     ZeRO-3" in proc.stdout and "critic    ZeRO-3" in proc.stdout
    row = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"][0]
    assert abs(row["kl"]) < 1e-4  # actor and reference both start as the SFT policy
    assert all(math.isfinite(row[k]) for k in ("reward", "policy_loss", "value_loss", "response_length"))
    merged = load_lm(out / "actor_merged")  # base + the trained adapter, as a plain ChatGLM folder
    assert type(merged).__name__ == "ChatGLMForConditionalGeneration"
    assert read_jsonl(out / "samples.jsonl")


def test_hybrid_engine_generates_as_plain_generation_and_restores_everything(tiny_glm, tmp_path):
    from rlhf_ds.dist import free_port

    out = tmp_path / "hybrid.json"
    env = child_env()
    check_ok(run_tree([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                       str(free_port()), str(REPO / "tests" / "workers" / "chatglm_hybrid_check.py"), str(out),
                       str(tiny_glm)], timeout=300, env=env))
    results = json.loads(out.read_text())
    assert sorted(results) == ["zero3-layers|lora", "zero3|full", "zero3|lora"]
    for combo, ranks in results.items():
        assert [r["new_tokens"] for r in ranks.values()] == [5, 9], combo
        for rank, r in ranks.items():
            where = f"{combo} rank {rank}"
            assert r["same_tokens"] and r["hooks_kept"], where
            assert r["weight_diff"] <= 1e-6 and r["loss_diff"] <= 1e-6 and r["grad_diff"] <= 1e-6, where
