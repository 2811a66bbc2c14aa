"""A native ChatGLM-6B: configuration, model and tokenizer, registered with transformers' Auto classes so that a
published chatglm-6b folder (config.json with model_type "chatglm" and its `auto_map`, pytorch_model-*.bin shards or
safetensors with the original parameter names, ice_text.model) loads without trust_remote_code:

    AutoConfig.from_pretrained(path)            -> ChatGLMConfig
    AutoModelForCausalLM.from_pretrained(path)  -> ChatGLMForConditionalGeneration (policy, reference)
    AutoModel.from_pretrained(path)             -> ChatGLMModel, last_hidden_state [B, T, H] (reward model, critic)
    AutoTokenizer.from_pretrained(path)         -> ChatGLMTokenizer

(The published `auto_map` sends AutoModel to the causal LM; here AutoModel is the backbone, as for every model in
rlhf_ds.) `register()` runs when rlhf_ds.models is imported. It registers the configuration and the tokenizer at
once (a LoRA adapter folder holds the tokenizer files but no config.json, so the tokenizer class must be findable by
its name alone), and the model classes the first time a ChatGLMConfig is built, which every load of a chatglm model
does first, so processes that never meet a ChatGLM model do not import the modeling code.

The code is ours; the architecture and tokenizer facts were read from the published THUDM/chatglm-6b Hugging Face
repository as mirrored on GitHub, github.com/greensheng/chatglm-6b (modeling_chatglm.py, tokenization_chatglm.py,
configuration_chatglm.py, config.json, tokenizer_config.json, pytorch_model.bin.index.json at its last commit, v1.1
with the 130528-token vocabulary), and the piece layout of ice_text.model from published encodings of it in the
tests of li-plus/chatglm.cpp (chatglm_test.cpp: the ids of "你好", of a two-round chat prompt and of a code snippet,
and the chat prompt format) and microsoft/onnxruntime-extensions (test/pp_api_test, its ChatGLM tokenizer test).
ChatGLM2-6B / ChatGLM3-6B (same model_type, another architecture and tokenizer), VisualGLM-6B, P-tuning v2
prefixes and quantized checkpoints are refused with a one-line error naming the config.json.
"""
from __future__ import annotations

_models_registered = False


def register() -> None:
    """Make model_type "chatglm" and the ChatGLMTokenizer class known to AutoConfig and AutoTokenizer (idempotent)."""
    from transformers import AutoConfig, AutoTokenizer

    from rlhf_ds.models.chatglm.configuration import ChatGLMConfig
    from rlhf_ds.models.chatglm.tokenization import ChatGLMTokenizer

    AutoConfig.register("chatglm", ChatGLMConfig, exist_ok=True)
    AutoTokenizer.register(ChatGLMConfig, tokenizer_class=ChatGLMTokenizer, exist_ok=True)


def register_model_classes() -> None:
    """Register the model classes with AutoModel and AutoModelForCausalLM (idempotent)."""
    global _models_registered
    if _models_registered:
        return
    _models_registered = True
    from transformers import AutoModel, AutoModelForCausalLM

    from rlhf_ds.models.chatglm.configuration import ChatGLMConfig
    from rlhf_ds.models.chatglm.modeling import ChatGLMForConditionalGeneration, ChatGLMModel

    register()
    AutoModel.register(ChatGLMConfig, ChatGLMModel, exist_ok=True)
    AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
