"""The ChatGLM-6B configuration: the fields of the published chatglm-6b config.json, under their published names.

A published folder's config.json still carries `auto_map` (pointing at configuration_chatglm.py /
modeling_chatglm.py, the remote code); it is dropped on load, so a folder that rlhf_ds saves never points at code it
does not contain. The standard names transformers and rlhf_ds look for (num_hidden_layers, max_position_embeddings,
intermediate_size) are aliases of the published ones.
"""
from __future__ import annotations

from transformers import PretrainedConfig

# The published chatglm-6b values of the special-token ids (see tokenization.py for where they sit).
PUBLISHED_IDS = {"mask_token_id": 130000, "gmask_token_id": 130001, "bos_token_id": 130004, "eos_token_id": 130005,
                 "pad_token_id": 3}


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_hidden_layers": "num_layers", "max_position_embeddings": "max_sequence_length",
                     "intermediate_size": "inner_hidden_size"}

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int | None = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int | None = 130004  # <sop>: the answer starts after it
    eos_token_id: int | list[int] | None = 130005  # <eop>
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]
    pad_token_id: int | None = 3  # <pad>
    use_cache: bool = True
    tie_word_embeddings: bool = False  # the checkpoint holds lm_head.weight and word_embeddings separately
    initializer_range: float = 0.02  # random initialisation only (tests); the published weights replace it
    quantization_bit: int = 0  # > 0: a quantized checkpoint (not supported: see modeling.check_supported)
    pre_seq_len: int | None = None  # P-tuning v2 prefix length (not supported)
    prefix_projection: bool = False

    def __post_init__(self, **kwargs):
        kwargs.pop("auto_map", None)  # remote code this folder does not need (and that rlhf_ds never writes)
        super().__post_init__(**kwargs)
        from rlhf_ds.models.chatglm import register_model_classes

        register_model_classes()  # a ChatGLM config exists: its model and tokenizer classes must be findable
