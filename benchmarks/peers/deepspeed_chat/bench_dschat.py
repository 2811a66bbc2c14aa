"""Time DeepSpeed-Chat (DeepSpeedExamples/applications/DeepSpeed-Chat) on rlhf_ds's benchmark workload.

    python benchmarks/peers/deepspeed_chat/bench_dschat.py --dschat /tmp/dse/applications/DeepSpeed-Chat \
        --algo ppo|dpo [--stages 2,3] [--worlds 1,2] [--steps 10] [--warmup 2]

The driver starts one `torchrun` per (world size, ZeRO stage) with OMP_NUM_THREADS=1, prints each configuration's
JSON line on stderr as it finishes and one summary line on stdout, like rlhf_ds's `launch/bench_ppo.py`.

  ppo  one step of DS-Chat's step 3: DeepSpeedRLHFEngine (actor, ref, critic, reward engines) and
       DeepSpeedPPOTrainer.generate_experience + train_rlhf, driven as training/step3_rlhf_finetuning/main.py does
       (MiniDataset of one generation batch, one PPO epoch);
  dpo  one optimizer step of training/step2_dpo_finetuning/main.py's loop: its model set-up (create_hf_model, its
       DeepSpeed configs) and its get_batch_logps; the loop body (main() is one function) is restated below.

Workload (rlhf_ds.benchmarks): the random OPT-style model of `workload_model` (vocab 8192, hidden 256, 6 layers);
per process 4 prompts of 64 random ids and 64 new tokens with EOS suppressed (PPO), or 4 pairs of 64 prompt + 64
answer random ids (DPO); precision from rlhf_ds's resolver; 2 warm-up steps, then the median of 10, each step
between barriers. DS-Chat itself is imported from the checkout given by --dschat; nothing of it lives here. The
runtime patches it needs on CPU with transformers 5 / DeepSpeed 0.19 are in `patch_dschat` (see README.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(tempfile.gettempdir()) / "rlhf_ds_bench"  # the same folder (and model) rlhf_ds's benchmark uses
PROMPT, ANSWER, ROWS = 64, 64, 4


# ------------------------------------------------------------------------------------------------ runtime patches


def patch_dschat(dschat: Path, precision: str) -> None:
    """Make DS-Chat importable and runnable on a CPU with transformers 5.x and DeepSpeed 0.19. Call before any
    `dschat` import. Each patch changes only what its comment says."""
    sys.path.insert(0, str(dschat))

    # 1. transformers 5 moved `no_init_weights` from transformers.modeling_utils to transformers.initialization;
    #    dschat/utils/model/model_utils.py imports it from the old place. Put it back there.
    import transformers.modeling_utils
    if not hasattr(transformers.modeling_utils, "no_init_weights"):
        from transformers.initialization import no_init_weights
        transformers.modeling_utils.no_init_weights = no_init_weights

    # 2. DS-Chat builds its optimizers itself as DeepSpeed's FusedAdam (CUDA kernel, JIT-built) or, with --offload,
    #    DeepSpeedCPUAdam (C++ op, JIT-built). On a CPU use torch's AdamW with its fused CPU kernel instead: what
    #    rlhf_ds's engines get on CPU ("torch_adam": true, "fused": true in the DeepSpeed optimizer params).
    #    Same update rule as FusedAdam's default adam_w_mode=True; the param groups (weight decay) pass through.
    def torch_adamw(params, lr, betas=(0.9, 0.999), **kw):
        return torch.optim.AdamW(params, lr=lr, betas=betas, fused=True, **kw)

    from dschat.rlhf import rlhf_engine
    rlhf_engine.FusedAdam = rlhf_engine.DeepSpeedCPUAdam = torch_adamw

    # 3. Under ZeRO-3, create_critic_model builds the backbone inside zero.Init (via HfDeepSpeedConfig), which
    #    makes its parameters bf16, but RewardModel adds its value head `v_head` afterwards as a plain fp32
    #    nn.Linear. DeepSpeed 0.19's ZeRO-3 then refuses the mixed dtypes (stage3 `defragment`: assert one dtype)
    #    for the critic; the reward model (same builder) gets the same cast. Cast the head to the backbone's
    #    dtype. No change under ZeRO-2/0, where both are fp32 until the engine casts the whole module.
    make_critic = rlhf_engine.create_critic_model

    def create_critic_model(*args, **kwargs):
        model = make_critic(*args, **kwargs)
        model.v_head.to(next(model.rwtransformer.parameters()).dtype)
        return model

    rlhf_engine.create_critic_model = create_critic_model

    # 4. DS-Chat's DeepSpeed configs know only fp16 and bf16 (--dtype fp32 fails with an UnboundLocalError). Where
    #    rlhf_ds's resolver picks fp32 (a CPU without native bf16 kernels), build the bf16 config and switch bf16
    #    off. Not applied when the run is bf16.
    if precision == "fp32":
        from dschat.utils import ds_utils

        def fp32(make):
            def wrapper(*args, **kwargs):
                call = inspect.signature(make).bind(*args, **kwargs)
                call.arguments["dtype"] = "bf16"
                cfg = make(*call.args, **call.kwargs)
                cfg["bfloat16"]["enabled"] = False
                return cfg
            return wrapper

        for module in (ds_utils, rlhf_engine):
            module.get_train_ds_config = fp32(ds_utils.get_train_ds_config)
            module.get_eval_ds_config = fp32(ds_utils.get_eval_ds_config)
    # Not patched, because on CPU it works as is: DS-Chat's device handling goes through get_accelerator(), whose
    # device_name() is "cpu" here, so to_device / torch.device(...) place everything on the CPU; the hybrid engine
    # (CUDA only) is simply left off, so generation runs `actor.module.generate(..., synced_gpus=zero3)`.


def torch_adamw_for_dpo(params, lr, betas):
    """Patch 2 for step 2 DPO, whose main() we restate: torch AdamW (fused CPU kernel) instead of FusedAdam."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, fused=True)


def load_dpo_main(dschat: Path):
    """training/step2_dpo_finetuning/main.py as a module (for get_batch_logps; its main() is not run)."""
    spec = importlib.util.spec_from_file_location("dschat_dpo_main",
                                                  dschat / "training" / "step2_dpo_finetuning" / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_step3_args(dschat: Path, argv: list[str]):
    """DS-Chat's own step 3 argument parser (so every option it reads has DS-Chat's default), fed our argv."""
    spec = importlib.util.spec_from_file_location("dschat_step3_main",
                                                  dschat / "training" / "step3_rlhf_finetuning" / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved, sys.argv = sys.argv, ["main.py", *argv]
    try:
        return module.parse_args()
    finally:
        sys.argv = saved


# ------------------------------------------------------------------------------------------------------- models


def critic_dir(policy: Path, tokenizer) -> Path:
    """A DS-Chat critic/reward checkpoint on the policy's backbone: DS-Chat's own create_critic_model (the OPT
    backbone from the policy's weights + a value head `v_head`, random with seed 1), saved as its step 2 saves
    one (pytorch_model.bin + config.json). rlhf_ds's reward folder has a scalar head of its own format, which
    DS-Chat cannot read; the head's values do not change what is timed."""
    from dschat.utils.model.model_utils import create_critic_model

    out = ROOT / "dschat_critic"
    if not (out / "pytorch_model.bin").exists():
        torch.manual_seed(1)
        model = create_critic_model(str(policy), tokenizer, ds_config=None, rlhf_training=False)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(policy / name, out / name)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out


def random_ids(generator: torch.Generator, rows: int, width: int) -> torch.Tensor:
    from rlhf_ds.benchmarks import VOCAB

    return torch.randint(10, VOCAB - 10, (rows, width), generator=generator)  # the ids rlhf_ds's bench draws


# ---------------------------------------------------------------------------------------------------------- PPO


def ppo_worker(dschat: Path, policy: Path, stage: int, steps: int, warmup: int, precision) -> dict:
    from dschat.rlhf.ppo_trainer import DeepSpeedPPOTrainer
    from dschat.rlhf.rlhf_engine import DeepSpeedRLHFEngine
    from dschat.utils.data.data_utils import MiniDataset
    from dschat.utils.utils import (
        get_all_reduce_mean,
        load_hf_tokenizer,
        set_random_seed,
    )

    from rlhf_ds import dist
    from rlhf_ds.benchmarks import FixedLengthSampling

    with dist.main_process_first():  # rank 0 builds the critic checkpoint, the others then read it
        tokenizer = load_hf_tokenizer(str(policy), fast_tokenizer=True)  # pad = eos, as DS-Chat sets for OPT
        critic = critic_dir(policy, tokenizer)
    # DS-Chat's step 3 options for this workload; dropout 0 in actor and critic as rlhf_ds does in PPO (and as
    # DS-Chat's own OPT scripts pass --actor_dropout 0.0); no --enable_hybrid_engine (CUDA only).
    args = parse_step3_args(dschat, [
        "--actor_model_name_or_path", str(policy), "--critic_model_name_or_path", str(critic),
        "--num_padding_at_beginning", "1", "--per_device_generation_batch_size", str(ROWS),
        "--per_device_training_batch_size", str(ROWS), "--generation_batches", "1", "--ppo_epochs", "1",
        "--max_prompt_seq_len", str(PROMPT), "--max_answer_seq_len", str(ANSWER),
        "--actor_learning_rate", "1e-5", "--critic_learning_rate", "1e-5", "--lr_scheduler_type", "constant",
        "--num_warmup_steps", "0", "--gradient_accumulation_steps", "1", "--actor_dropout", "0.0",
        "--critic_dropout", "0.0", "--actor_zero_stage", str(stage), "--critic_zero_stage", str(stage),
        "--dtype", "bf16" if precision.name == "fp32" else precision.name,  # fp32: see patch 4
        "--seed", "1234", "--local_rank", os.environ.get("LOCAL_RANK", "0")])
    # what step 3's main() sets before building the engines
    args.global_rank = torch.distributed.get_rank()
    args.gradient_accumulation_steps_actor = args.gradient_accumulation_steps
    args.end_of_conversation_token = "<|endoftext|>"
    set_random_seed(args.seed)
    engine = DeepSpeedRLHFEngine(actor_model_name_or_path=args.actor_model_name_or_path,
                                 critic_model_name_or_path=args.critic_model_name_or_path, tokenizer=tokenizer,
                                 num_total_iters=warmup + steps, args=args)
    trainer = DeepSpeedPPOTrainer(engine, args)

    # The actor's generate call, wrapped: (a) timed, which splits generate_experience into generation and the
    # experience forwards; (b) given rlhf_ds's benchmark sampling (FixedLengthSampling: sampling at temperature 1,
    # no top-k/top-p, EOS suppressed so every answer has exactly 64 tokens). DS-Chat's own arguments stay (pad id,
    # attention mask, synced_gpus under ZeRO-3); its max_length (prompt + 64) becomes the equal max_new_tokens.
    module = engine.actor.module
    generate, gen_seconds = module.generate, []
    sampling = FixedLengthSampling(max_new_tokens=ANSWER, eos_token_ids=[tokenizer.eos_token_id],
                                   pad_token_id=tokenizer.pad_token_id).generation_kwargs()

    def timed_generate(*a, **kw):
        kw.pop("max_length", None)
        kw.update({k: v for k, v in sampling.items() if k != "pad_token_id"})
        t0 = time.time()
        out = generate(*a, **kw)
        gen_seconds.append(time.time() - t0)
        return out

    module.generate = timed_generate

    g = torch.Generator().manual_seed(dist.rank())
    device = torch.device(dist.device())
    times: dict[str, list[float]] = {"generation": [], "experience": [], "training": [], "total": []}
    for step in range(warmup + steps):
        prompts = random_ids(g, ROWS, PROMPT).to(device)
        dist.barrier()
        t0 = time.time()
        out = trainer.generate_experience(prompts, torch.ones_like(prompts), step)
        t1 = time.time()
        # step 3 main()'s loop for one generation batch and one PPO epoch over one micro-batch
        exp_dataset = MiniDataset(args.generation_batches, args.per_device_training_batch_size).add(out)
        for _ in range(args.ppo_epochs):
            for exp_data in exp_dataset:
                actor_loss, critic_loss = trainer.train_rlhf(exp_data)
                actor_loss.item(), critic_loss.item()
                average_reward = exp_data["rewards"].mean()
        get_all_reduce_mean(average_reward).item()
        t2 = time.time()
        dist.barrier()
        total = time.time() - t0
        assert out["input_ids"].shape == (ROWS, PROMPT + ANSWER) and bool(out["attention_mask"].all()), \
            "every answer must have 64 tokens"
        if step >= warmup:
            times["generation"].append(gen_seconds[-1])
            times["experience"].append(t1 - t0 - gen_seconds[-1])
            times["training"].append(t2 - t1)
            times["total"].append(total)
    return {"prompts_per_rank": ROWS, "samples_per_prompt": 1, "hybrid_engine": "off",
            **{f"{k}_s": round(statistics.median(v), 3) for k, v in times.items()}}


# ---------------------------------------------------------------------------------------------------------- DPO


def dpo_worker(dschat: Path, policy: Path, stage: int, steps: int, warmup: int, precision) -> dict:
    import deepspeed
    from dschat.utils.ds_utils import get_eval_ds_config, get_train_ds_config
    from dschat.utils.model.model_utils import create_hf_model
    from dschat.utils.utils import (
        get_optimizer_grouped_parameters,
        load_hf_tokenizer,
        set_random_seed,
    )
    from transformers import AutoModelForCausalLM, get_scheduler

    from rlhf_ds import dist

    dpo = load_dpo_main(dschat)
    world = torch.distributed.get_world_size()
    dtype = "bf16" if precision.name == "fp32" else precision.name  # fp32: see patch 4

    # step 2 DPO main()'s set-up, with its defaults except: batch 4 pairs, dropout 0 (its OPT script's
    # --dropout 0.0), lr 1e-5, constant schedule, FusedAdam -> torch AdamW (patch 2)
    ds_config = get_train_ds_config(offload=False, dtype=dtype, stage=stage)
    ds_config["train_micro_batch_size_per_gpu"] = ROWS
    ds_config["train_batch_size"] = ROWS * world
    set_random_seed(1234)
    tokenizer = load_hf_tokenizer(str(policy), fast_tokenizer=True)
    model = create_hf_model(AutoModelForCausalLM, str(policy), tokenizer, ds_config, dropout=0.0)
    ref_stage = stage if stage == 3 else 0
    ref_ds_config = get_eval_ds_config(False, dtype, ref_stage)
    ref_ds_config["train_micro_batch_size_per_gpu"] = ROWS
    ref_ds_config["train_batch_size"] = ROWS * world
    ref_model = create_hf_model(AutoModelForCausalLM, str(policy), tokenizer, ref_ds_config, dropout=0.0)
    optimizer = torch_adamw_for_dpo(get_optimizer_grouped_parameters(model, 0.0, 5e-4), lr=1e-5, betas=(0.9, 0.95))
    lr_scheduler = get_scheduler(name="constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=warmup + steps)
    model, optimizer, _, lr_scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                             lr_scheduler=lr_scheduler, dist_init_required=True)
    ref_model, *_ = deepspeed.initialize(model=ref_model, config=ref_ds_config)
    ref_model.eval()
    model.train()
    beta, label_smoothing = 0.1, 0.0  # main.py's defaults

    g = torch.Generator().manual_seed(dist.rank())
    device = torch.device(dist.device())
    times = []
    for step in range(warmup + steps):
        # a DataCollatorReward batch: 4 chosen rows, then their 4 rejected rows; a pair shares its 64-token prompt
        # and has two different random 64-token answers (first answer tokens differ: divergence at 64)
        prompt, chosen, rejected = random_ids(g, ROWS, PROMPT), random_ids(g, ROWS, ANSWER), random_ids(g, ROWS, ANSWER)
        rejected[:, 0] = torch.where(rejected[:, 0] == chosen[:, 0], chosen[:, 0] + 1, rejected[:, 0])
        ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)]).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        dist.barrier()
        t0 = time.time()
        # ---- step 2 DPO main()'s training-loop body (restated: main() is a single function) ----
        batch_size = batch["input_ids"].shape[0] // 2
        chosen_input_ids = batch["input_ids"][:batch_size]
        rejected_input_ids = batch["input_ids"][batch_size:]
        label_mask = (batch["input_ids"] != tokenizer.pad_token_id).int()
        for i in range(batch_size):
            divergence_ind = (chosen_input_ids[i] != rejected_input_ids[i]).nonzero().squeeze(-1)
            divergence_ind = divergence_ind[0] if len(divergence_ind) > 0 else 0
            label_mask[i][:divergence_ind] = 0
            label_mask[i + batch_size][:divergence_ind] = 0
        outputs = model(**batch, use_cache=False)
        with torch.no_grad():
            ref_outputs = ref_model(**batch)
        logps = dpo.get_batch_logps(outputs.logits, batch["input_ids"], label_mask)
        ref_logps = dpo.get_batch_logps(ref_outputs.logits, batch["input_ids"], label_mask)
        logits = beta * ((logps[:batch_size] - ref_logps[:batch_size]) -
                         (logps[batch_size:] - ref_logps[batch_size:]))
        loss = (-torch.nn.functional.logsigmoid(logits) * (1 - label_smoothing) -
                torch.nn.functional.logsigmoid(-logits) * label_smoothing).mean(0)
        model.backward(loss)
        model.step()
        # ---- end of the loop body ----
        dist.barrier()
        if step >= warmup:
            times.append(time.time() - t0)
        assert int(label_mask[0].sum()) == ANSWER, "the loss must cover the 64 answer tokens"
    return {"pairs_per_rank": ROWS, "step_s": round(statistics.median(times), 3)}


# ------------------------------------------------------------------------------------------------- worker/driver


def commit_of(dschat: Path) -> str | None:
    proc = subprocess.run(["git", "-C", str(dschat), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or None


def worker(args) -> None:
    import deepspeed

    from rlhf_ds import dist
    from rlhf_ds.benchmarks import machine, workload_model
    from rlhf_ds.engines.precision import resolve_precision

    # DS-Chat's main() calls deepspeed.init_distributed(); on CPU that is gloo (no oneCCL here), as rlhf_ds uses
    deepspeed.init_distributed(dist_backend="gloo" if dist.device().type == "cpu" else None)
    with dist.main_process_first():
        policy, _ = workload_model(ROOT)  # rlhf_ds's benchmark model (built once, shared with rlhf_ds's bench)
    precision = resolve_precision(bf16=True, model_dir=policy)  # as rlhf_ds's --bf16 decides it
    patch_dschat(args.dschat, precision.name)
    run = ppo_worker if args.algo == "ppo" else dpo_worker
    figures = run(args.dschat, policy, args.zero_stage, args.steps, args.warmup, precision)
    result = {"system": "deepspeed-chat", "algo": args.algo, "zero_stage": args.zero_stage,
              "world_size": dist.world_size(), **figures, **precision.record(), **machine(),
              "dschat_commit": commit_of(args.dschat)}
    if dist.is_main():
        Path(args.result_file).write_text(json.dumps(result))


def driver(args) -> None:
    from rlhf_ds.dist import free_port

    results = []
    for world in [int(w) for w in args.worlds.split(",")]:
        for stage in [int(s) for s in args.stages.split(",")]:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                result_file = f.name
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker", "--dschat", str(args.dschat),
                   "--algo", args.algo, "--zero_stage", str(stage), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--result_file", result_file]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
            env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results.append(json.loads(Path(result_file).read_text()))
            Path(result_file).unlink()
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    workload = ("opt-7m, 4 prompts x 64 tokens per process, 64 new tokens" if args.algo == "ppo" else
                "opt-7m, 4 pairs x (64 prompt + 64 answer tokens) per process")
    print(json.dumps({"bench": f"dschat_{args.algo}_step", "system": "deepspeed-chat",
                      "workload": f"{workload}, rlhf_ds --bf16 precision, OMP_NUM_THREADS=1, median of steps after "
                                  "warm-up", "dschat_commit": commit_of(args.dschat), "steps": args.steps,
                      "warmup": args.warmup, "results": results}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dschat", type=Path, required=True, help="DeepSpeedExamples/applications/DeepSpeed-Chat")
    parser.add_argument("--algo", choices=("ppo", "dpo"), default="ppo")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero_stage", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--result_file", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dschat = args.dschat.resolve()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
