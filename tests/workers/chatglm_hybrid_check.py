"""Run under torchrun (2 ranks) by tests/models/test_chatglm.py: the hybrid engine with a ChatGLM actor (chat prompts
ending in [gMASK]<sop>, left-padded) against plain generation and a never-switched engine; rank 0 writes JSON.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/chatglm_hybrid_check.py OUT.json MODEL_DIR
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hybrid_check import round_trip  # noqa: E402

from rlhf_ds import dist  # noqa: E402
from rlhf_ds.algo.sequence import pad_sequences  # noqa: E402
from rlhf_ds.benchmarks import FixedLengthSampling  # noqa: E402
from rlhf_ds.models.loading import load_tokenizer  # noqa: E402

QUESTIONS = [["你好", "请介绍一下清华大学。"], ["1+1等于几？", "写一首关于春天的诗"]]


def chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def check(model_dir: str, stage: int, finetuning: str, gather_layers: int = 0) -> dict:
    rank = dist.rank()
    tok = load_tokenizer(model_dir, padding_side="left")
    prompts, mask = pad_sequences([chat_ids(tok, q) for q in QUESTIONS[rank]], tok.pad_token_id, "left")
    # ranks stop at different lengths: without collectives during decoding, nobody waits for anybody
    settings = FixedLengthSampling(max_new_tokens=5 + 4 * rank, eos_token_ids=[tok.eos_token_id],
                                   pad_token_id=tok.pad_token_id, do_sample=False)
    rows = [chat_ids(tok, q) + tok("好的，我来回答。", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for q in QUESTIONS[rank]]
    ids, train_mask = pad_sequences(rows, tok.pad_token_id, "right")
    train_inputs = {"input_ids": ids, "attention_mask": train_mask, "labels": ids.masked_fill(train_mask == 0, -100)}
    return round_trip(model_dir, stage, finetuning, gather_layers, prompts, mask, settings, train_inputs)


def main() -> None:
    out, model_dir = sys.argv[1], sys.argv[2]
    dist.init_distributed()
    results = {f"zero3|{ft}": check(model_dir, 3, ft) for ft in ("lora", "full")}
    results["zero3-layers|lora"] = check(model_dir, 3, "lora", gather_layers=1)
    if dist.is_main():
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.shutdown(0)


if __name__ == "__main__":
    main()
