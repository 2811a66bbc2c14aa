"""Models: loading, heads, fine-tuning. Native architectures that transformers lacks register themselves here."""
from rlhf_ds.models.chatglm import register as _register_chatglm

_register_chatglm()
