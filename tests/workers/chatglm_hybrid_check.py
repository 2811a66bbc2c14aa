"""Run under torchrun (2 ranks) by tests/models/test_chatglm.py: the hybrid engine with a ChatGLM actor (chat prompts
ending in [gMASK]<sop>, left-padded) against plain generation and a never-switched engine; rank 0 writes JSON.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/chatglm_hybrid_check.py OUT.json MODEL_DIR
"""
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hybrid_check import build, engine_for, snapshot  # noqa: E402

from rlhf_ds import dist  # noqa: E402
from rlhf_ds.algo.sequence import pad_sequences  # noqa: E402
from rlhf_ds.engines.generation import SamplingSettings  # noqa: E402
from rlhf_ds.engines.hybrid import HybridEngine, zero_offload  # noqa: E402
from rlhf_ds.models.loading import load_tokenizer  # noqa: E402

QUESTIONS = [["你好", "请介绍一下清华大学。"], ["1+1等于几？", "写一首关于春天的诗"]]


def chat_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def train_step(engine, tok, rank: int) -> tuple[float, list[torch.Tensor]]:
    from deepspeed.utils import safe_get_full_grad

    rows = [chat_ids(tok, q) + tok("好的，我来回答。", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for q in QUESTIONS[rank]]
    ids, mask = pad_sequences(rows, tok.pad_token_id, "right")
    labels = ids.masked_fill(mask == 0, -100)
    out = engine(input_ids=ids, attention_mask=mask, labels=labels)
    engine.backward(out.loss)
    grads = [safe_get_full_grad(p).clone() for p in engine.module.parameters() if p.requires_grad]
    engine.step()
    return out.loss.item(), grads


def check(model_dir: str, stage: int, finetuning: str, gather_layers: int = 0) -> dict:
    rank = dist.rank()
    tok = load_tokenizer(model_dir, padding_side="left")
    prompts, mask = pad_sequences([chat_ids(tok, q) for q in QUESTIONS[rank]], tok.pad_token_id, "left")
    # ranks stop at different lengths: without collectives during decoding, nobody waits for anybody
    settings = SamplingSettings(max_new_tokens=5 + 4 * rank, eos_token_ids=[tok.eos_token_id],
                                pad_token_id=tok.pad_token_id, do_sample=False, suppress_eos=True)
    model = build(model_dir, finetuning)
    plain = copy.deepcopy(model).eval()
    engine = engine_for(model, stage)
    hybrid = HybridEngine(engine, gather_layers=gather_layers, merge_lora="on")
    before = snapshot(engine)
    hooks = (len(zero_offload(engine).forward_hooks), len(zero_offload(engine).backward_hooks)) if stage == 3 else None
    ours = hybrid.generate(prompts, mask, settings)
    with torch.no_grad():
        ref = plain.generate(input_ids=prompts, attention_mask=mask, generation_config=settings.generation_config())
    ref = ref[:, prompts.shape[1]:]
    after = snapshot(engine)
    weight_diff = max((a - b).abs().max().item() for a, b in zip(before, after) if a.numel())
    hooks_after = (len(zero_offload(engine).forward_hooks), len(zero_offload(engine).backward_hooks)) \
        if stage == 3 else None
    loss_switched, grads_switched = train_step(engine, tok, rank)
    loss_never, grads_never = train_step(engine_for(build(model_dir, finetuning), stage), tok, rank)
    grad_diff = max((a - b).abs().max().item() for a, b in zip(grads_switched, grads_never))
    result = {"same_tokens": bool(torch.equal(ours, ref)), "new_tokens": ours.shape[1], "weight_diff": weight_diff,
              "hooks_kept": hooks == hooks_after, "loss_diff": abs(loss_switched - loss_never),
              "grad_diff": grad_diff}
    return {k: v for k, v in zip(range(dist.world_size()), dist.all_gather_object(result))}


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
