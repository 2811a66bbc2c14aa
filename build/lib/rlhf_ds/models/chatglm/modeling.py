"""ChatGLM-6B (GLM) as a transformers model: `ChatGLMModel` (the backbone, `last_hidden_state` [B, T, H]) and
`ChatGLMForConditionalGeneration` (the causal LM), with the published parameter names.

The architecture, as the published modeling code defines it:

  * block: h = LN_in(x); x' = h * alpha + Attention(h); m = LN_post(x'); out = m * alpha + MLP(m), alpha =
    sqrt(2 * 28) = sqrt(56) at any depth: the published ChatGLMModel builds each GLMBlock without passing its
    num_layers, so the block's default of 28 sets alpha whatever config.num_layers says. The residual branch
    carries the *normalised* input, scaled by alpha.
  * attention: one `query_key_value` Linear whose output is viewed per head as [q | k | v] (heads outer, the three
    parts inner); scores (q / (sqrt(d) * (layer + 1))) k^T in the model dtype, masked with -10000, then multiplied
    back by (layer + 1) in float32 before the softmax (query_key_layer_scaling); `dense` projects back.
  * 2-D rotary positions: the first half of each head's dims rotates with the position id, the second half with the
    block position id, each as rotate-half RoPE of dimension head_dim / 2 (base 10000, inv_freq kept in fp16; an
    fp16 model computes the angles in fp16, as the published code does).
  * MLP: dense_h_to_4h, tanh-approximated GeLU, dense_4h_to_h.
  * prefix LM: every token before the first <sop> (bos) is context, attended bidirectionally; <sop> and everything
    after it is causal. Position ids run 0.. over the context and then stay at the [gMASK] (or [MASK]) position;
    block position ids are 0 over the context and 1, 2, ... from <sop> on.

Callers pass a 2-D padding mask [B, T] (left or right padding, or both) and may pass 1-D position ids (ignored: the
model derives ChatGLM's own from input_ids and the padding mask, counting real tokens only) or explicit ChatGLM
position ids [B, 2, T] (position, block position). `generate` computes those for every step from the whole
sequence, so greedy decoding with and without the KV cache gives the same tokens.

Not supported, with a one-line error: P-tuning v2 prefixes (`pre_seq_len`) and quantized checkpoints
(`quantization_bit`). Facts checked against: see rlhf_ds/models/chatglm/__init__.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from rlhf_ds.errors import UserError
from rlhf_ds.models.chatglm.configuration import ChatGLMConfig

MASKED_SCORE = -10000.0  # what the published attention writes into masked scores (before the layer scaling)
ROTARY_BASE = 10000


# config.json fields that only ChatGLM2-6B / ChatGLM3-6B have (the same model_type "chatglm", another architecture)
LATER_GENERATION_FIELDS = ("multi_query_attention", "padded_vocab_size", "ffn_hidden_size", "kv_channels", "rmsnorm")


def check_supported(config: ChatGLMConfig) -> None:
    """Refuse, in one line naming the file and the fix, what this implementation does not cover."""
    where = f"{config.name_or_path}/config.json" if config.name_or_path else "config.json"
    later = [name for name in LATER_GENERATION_FIELDS if hasattr(config, name)]
    if later:
        raise UserError(f"chatglm: {where} ({', '.join(later)}) is a ChatGLM2-6B / ChatGLM3-6B configuration "
                        f"(multi-query attention, RMSNorm, SwiGLU, another tokenizer), which rlhf_ds does not "
                        f"implement; use a ChatGLM-6B folder, or GLM-4 through transformers' glm / glm4 model types")
    if hasattr(config, "eva_config") or hasattr(config, "qformer_config"):
        raise UserError(f"chatglm: {where} is a VisualGLM-6B configuration (an image encoder in front of ChatGLM-6B), "
                        f"which rlhf_ds does not implement; use the text-only chatglm-6b folder")
    if config.pre_seq_len is not None:
        raise UserError(f"chatglm: {where} sets pre_seq_len={config.pre_seq_len} (a P-tuning v2 prefix encoder), "
                        f"which rlhf_ds does not support; set it to null and fine-tune with --finetuning_type lora")
    if config.quantization_bit:
        raise UserError(f"chatglm: {where} sets quantization_bit={config.quantization_bit} (a quantized "
                        f"checkpoint), which rlhf_ds does not support; use the full-precision chatglm-6b weights")


# ------------------------------------------------------------------------------------- positions and the mask

def glm_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: ChatGLMConfig,
                     require_sop: bool = False) -> torch.Tensor:
    """ChatGLM's position ids [B, 2, T] (position, block position) for a padded batch.

    Counted over real tokens only (pads get 0 and are masked anyway), so a row means the same under left padding,
    right padding or both. The context is every real token before the row's first <sop>; [gMASK] (else [MASK]) is
    looked for inside it. A row without <sop> is all context (bidirectional, block 0), as the published tokenizer
    treats an input without it; `require_sop` refuses such rows (generation needs to know where the answer starts).
    """
    batch, length = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        real = attention_mask[:, -length:].bool()
    idx = torch.arange(length, device=device).expand(batch, length)
    rank = real.long().cumsum(-1) - 1  # index among the real tokens
    sop = (input_ids == config.bos_token_id) & real
    if require_sop and not bool(sop.any(-1).all()):
        raise ValueError("ChatGLM generates the answer after <sop>: every prompt must end with [gMASK]<sop> (the "
                         "tokenizer adds them with add_special_tokens=True, and its chat template writes them)")
    first_sop = torch.where(sop, idx, length).min(-1).values
    context = idx < first_sop[:, None]
    context_length = (real & context).sum(-1)

    def first(token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        hit = (input_ids == token_id) & real & context
        return hit.any(-1), torch.where(hit, idx, length - 1).min(-1).values

    has_gmask, gmask_at = first(config.gmask_token_id)
    has_mask, mask_at = first(config.mask_token_id)
    mask_rank = rank.gather(1, torch.where(has_gmask, gmask_at, mask_at)[:, None])  # [B, 1]
    # 2-D: the answer's positions stay at the mask's. 1-D: only for [MASK]; after [gMASK] they keep counting.
    shift = (has_gmask | has_mask) if config.position_encoding_2d else (has_mask & ~has_gmask)
    position = torch.where(context | ~shift[:, None], rank, mask_rank)
    block = torch.where(context, 0, rank - context_length[:, None] + 1)
    return torch.stack([position.clamp(min=0), block.clamp(min=0)], dim=1)


def prefix_lm_mask(key_is_real: torch.Tensor, query_is_context: torch.Tensor, past_length: int) -> torch.Tensor:
    """Which keys each query may attend to, [B, 1, T, K] (True = attend): causal, plus context to context in both
    directions; pad keys never. Queries are the last T of K positions (the first `past_length` are cached)."""
    batch, length = query_is_context.shape
    keys = key_is_real.shape[1]
    device = key_is_real.device
    query_at = torch.arange(length, device=device) + past_length
    causal = torch.arange(keys, device=device)[None, :] <= query_at[:, None]  # [T, K]
    key_is_context = torch.zeros(batch, keys, dtype=torch.bool, device=device)
    key_is_context[:, past_length:] = query_is_context
    both_context = query_is_context[:, :, None] & key_is_context[:, None, :]
    return ((causal[None] | both_context) & key_is_real[:, None, :]).unsqueeze(1)


# -------------------------------------------------------------------------------------------------- layers

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, T, dim] for rotate-half RoPE at these positions, with the published numerics: inv_freq is
    rounded to fp16 (the published buffer is created in fp16 and never loaded), and an fp16 model multiplies the
    positions by it and takes cos / sin in fp16, as the published code does with its fp16 buffer. Other dtypes use
    float32 angles (the published code in fp32; in bf16 it would round the positions themselves to bf16)."""
    inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angle_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    angles = positions.to(angle_dtype)[..., None] * inv_freq.half().to(angle_dtype)
    emb = torch.cat((angles, angles), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class ChatGLMAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.position_encoding_2d = config.position_encoding_2d
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor,
                past_key_values: Cache | None = None) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape
        mixed = self.query_key_value(hidden_states).view(batch, length, self.num_heads, 3 * self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in mixed.split(self.head_dim, dim=-1))  # [B, nh, T, hn]
        dtype = query.dtype
        if self.position_encoding_2d:
            half = self.head_dim // 2
            cos, sin = rotary_cos_sin(position_ids[:, 0], half, dtype)
            cos_b, sin_b = rotary_cos_sin(position_ids[:, 1], half, dtype)
            query = torch.cat([apply_rotary(query[..., :half], cos, sin),
                               apply_rotary(query[..., half:], cos_b, sin_b)], dim=-1)
            key = torch.cat([apply_rotary(key[..., :half], cos, sin),
                             apply_rotary(key[..., half:], cos_b, sin_b)], dim=-1)
        else:
            cos, sin = rotary_cos_sin(position_ids[:, 0], self.head_dim, dtype)
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        coeff = float(self.layer_idx + 1)  # query_key_layer_scaling
        scores = torch.matmul(query / (math.sqrt(self.head_dim) * coeff), key.transpose(-1, -2))
        scores = scores.masked_fill(~allowed, MASKED_SCORE)
        probs = F.softmax(scores.float() * coeff, dim=-1).to(value.dtype)
        context = torch.matmul(probs, value).transpose(1, 2).reshape(batch, length, hidden)
        return self.dense(context)


class ChatGLMMLP(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        inner = config.inner_hidden_size or 4 * config.hidden_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, inner, bias=True)
        self.dense_4h_to_h = nn.Linear(inner, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


# GLMBlock's default num_layers in the published modeling_chatglm.py, which ChatGLMModel never overrides.
PUBLISHED_BLOCK_LAYERS = 28


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.alpha = (2 * PUBLISHED_BLOCK_LAYERS) ** 0.5  # see the module docstring
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = ChatGLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = ChatGLMMLP(config)

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool = False) -> torch.Tensor:
        attention_input = self.input_layernorm(hidden_states)
        attention_output = self.attention(attention_input, position_ids, attention_mask, past_key_values)
        hidden_states = attention_input * self.alpha + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input)


# -------------------------------------------------------------------------------------------------- models

class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    config: ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    # the published checkpoint stores each layer's rotary inv_freq; it is recomputed, as the published code does
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]


class ChatGLMModel(ChatGLMPreTrainedModel):
    """The GLM transformer: word embeddings, the blocks, the final LayerNorm. Batch-first in and out."""

    # loaded from a causal-LM checkpoint (as published) the backbone leaves lm_head.weight aside
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"^lm_head\."]

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        check_supported(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"ChatGLM takes a 2-D padding mask [batch, time] (1 = real token) and builds the "
                             f"prefix-LM mask itself; got a {attention_mask.dim()}-D attention_mask")

        if position_ids is not None and position_ids.dim() == 3:  # explicit ChatGLM ids [B, 2, T]
            position_ids = position_ids.to(inputs_embeds.device)
        elif past_length:
            raise ValueError("with a KV cache ChatGLM needs its own position ids [batch, 2, time] (position, block "
                             "position) for the new tokens; generate() computes them")
        elif input_ids is None:
            raise ValueError("with inputs_embeds pass ChatGLM's position ids [batch, 2, time] as well")
        else:  # 1-D position ids (cumsum of the mask) carry nothing the mask does not: derive ChatGLM's own
            position_ids = glm_position_ids(input_ids, attention_mask, self.config)

        if attention_mask is None:
            key_is_real = torch.ones(batch, past_length + length, dtype=torch.bool, device=inputs_embeds.device)
        else:
            key_is_real = attention_mask.bool().to(inputs_embeds.device)
            if key_is_real.shape[1] == length and past_length:  # a mask for the new tokens only
                key_is_real = torch.cat([key_is_real.new_ones(batch, past_length), key_is_real], dim=1)
            if key_is_real.shape[1] != past_length + length:
                raise ValueError(f"attention_mask covers {key_is_real.shape[1]} positions; expected "
                                 f"{past_length + length} (cached + new)")
        allowed = prefix_lm_mask(key_is_real, position_ids[:, 1] == 0, past_length)

        all_hidden = [] if output_hidden_states else None
        hidden_states = inputs_embeds
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, position_ids=position_ids, attention_mask=allowed,
                                  past_key_values=past_key_values if use_cache else None, use_cache=use_cache)
        hidden_states = self.final_layernorm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        out = BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                      past_key_values=past_key_values if use_cache else None,
                                      hidden_states=tuple(all_hidden) if all_hidden is not None else None)
        return out if return_dict is not False else out.to_tuple()


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """The causal LM: ChatGLMModel under `transformer`, and `lm_head` (no bias), as published."""

    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}  # only if tie_word_embeddings

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast | tuple:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                               output_hidden_states=output_hidden_states, return_dict=True)
        hidden_states = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:  # token t predicts t + 1; -100 is ignored; float32, as published
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            if shift_logits.shape[1] != shift_labels.shape[1]:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                   ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states)
        return result if return_dict is not False else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      past_key_values: Cache | None = None,
                                      attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None, is_first_iteration: bool = False,
                                      **kwargs):
        """The generic preparation, with ChatGLM's position ids of the tokens this step feeds, computed from the
        whole sequence so far (where <sop> and [gMASK] are) instead of generate's running 1-D counter."""
        kwargs.pop("position_ids", None)
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, past_key_values=past_key_values,
            attention_mask=attention_mask, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration,
            **kwargs)
        fed = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
        positions = glm_position_ids(input_ids, attention_mask, self.config, require_sop=True)
        inputs["position_ids"] = positions[..., -fed.shape[1]:].contiguous()
        return inputs
