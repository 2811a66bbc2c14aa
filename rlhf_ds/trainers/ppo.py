"""PPO stage: optimise the actor against a reward (a trained RM or a Python function) with a per-token KL penalty
to a frozen reference, using a critic for GAE. Four DeepSpeed engines per rank: actor, critic, reference, reward.

One PPO step (see `step`):
  1. rollout      generate responses to this rank's prompts             -> engines/generation.py `generate`
  2. experience   log-probs (actor, reference), values, scores; the KL penalty and GAE   -> algo/ppo.py
  3. training     `ppo_epochs` passes of clipped policy / value losses over shuffled micro-batches
  4. bookkeeping  metrics.jsonl, samples.jsonl, evaluation, checkpoints
The math lives in rlhf_ds/algo/ppo.py; this file only moves tensors between engines and those functions.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import rlhf_ds
from rlhf_ds import dist
from rlhf_ds.algo import ppo as algo
from rlhf_ds.algo.losses import sft_loss
from rlhf_ds.algo.sequence import gather_last, pad_sequences, position_ids_from_mask
from rlhf_ds.args import (
    DataArguments,
    FinetuningArguments,
    ModelArguments,
    PPOArguments,
    RuntimeArguments,
    TrainingArguments,
    parse_args,
    to_dict,
)
from rlhf_ds.checkpoint import (
    check_output_dir,
    convert_to_universal,
    die_if_asked,
    export_merged_lora,
    gather_state_dict,
    is_adapter_dir,
    load_resumable,
    plan_resume,
    publish_files,
    save_causal_lm,
    save_resumable,
    truncate_run_logs,
)
from rlhf_ds.data.collate import SFTCollator, even_shards, train_sampler
from rlhf_ds.data.loading import DataReport, load_examples, split_eval, tokenize_prompts
from rlhf_ds.data.template import resolve_template
from rlhf_ds.engines.ds_config import EngineSettings, engine_config
from rlhf_ds.engines.precision import run_precision
from rlhf_ds.engines.factory import create_inference_engine, create_train_engine
from rlhf_ds.engines.generation import SamplingSettings, build_generator
from rlhf_ds.engines.hybrid import deepspeed_hybrid_problem, plain_linear
from rlhf_ds.errors import Preempted, UserError
from rlhf_ds.models.finetuning import apply_finetuning, count_parameters
from rlhf_ds.models.heads import (
    HEAD_META,
    ScalarHeadModel,
    is_lora,
    load_scalar_model,
    read_head_meta,
    save_scalar_model,
)
from rlhf_ds.models.loading import (
    context_length,
    disable_dropout,
    eos_token_ids,
    load_backbone,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from rlhf_ds.rewards import call_reward_fn, load_reward_fn
from rlhf_ds.tracking import Tracker, format_metrics, progress, setup_logging
from rlhf_ds.trainers.base import LoopState

logger = logging.getLogger("rlhf_ds.ppo")

FINISHED_MARKER = "train_results.json"


@dataclass
class Rollout:
    """One rank's rollout batch. Per-token tensors are [B, N] over the response positions."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor
    response: torch.Tensor  # [B, N], pad after EOS
    mask: torch.Tensor  # 1 up to and including the first EOS
    ref_logprobs: torch.Tensor
    scores: torch.Tensor  # [B] raw reward (after the missing-EOS penalty)
    normalized: torch.Tensor  # [B] what enters the reward
    ptx_ids: list[list[int]]  # the prompts' reference answers (prompt + answer), for PPO-ptx
    ptx_prompt_len: list[int]
    # the old policy's log-probs and the old values, and what follows from them (see PPOTrainer.complete_rollout);
    # None until then when the experience is fused into the first training forward
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.mask], dim=1)

    def select(self, idx: torch.Tensor) -> "Rollout":
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx.tolist()]
        return Rollout(**values)


def response_logits(engine, sequences: torch.Tensor, attention_mask: torch.Tensor, n_response: int) -> torch.Tensor:
    """Logits at the positions that predict the response tokens, [B, N, V] (only those are computed)."""
    out = engine(input_ids=sequences, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                 logits_to_keep=n_response + 1)
    return out.logits[:, :-1]


def response_values(engine, sequences: torch.Tensor, attention_mask: torch.Tensor, n_response: int) -> torch.Tensor:
    """The critic's value of the state before each response token, [B, N]."""
    values = engine(input_ids=sequences, attention_mask=attention_mask)
    return values[:, -n_response - 1:-1]


@dataclass
class PPOTrainer:
    model_args: ModelArguments
    data_args: DataArguments
    ft_args: FinetuningArguments
    args: TrainingArguments
    rt: RuntimeArguments
    ppo: PPOArguments
    report: DataReport = field(default_factory=DataReport)

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        args, rt, ppo = self.args, self.rt, self.ppo
        dist.init_distributed(rt.dist_timeout)
        setup_logging()
        from transformers import set_seed

        set_seed(args.seed)
        self._check_flags()
        self.prec = run_precision(rt, self.model_args.model_name_or_path)
        self.precision, self.dtype = self.prec.name, self.prec.dtype
        logger.info("PPO: %s", self.prec.describe())
        self.resume_from, self.universal = plan_resume(Path(args.output_dir), args.resume, args.overwrite_output_dir,
                                                       FINISHED_MARKER, self.resume_config(),
                                                       args.universal_checkpoint)
        self.out = check_output_dir(args.output_dir, args.overwrite_output_dir, FINISHED_MARKER,
                                    keep=self.resume_from is not None)
        if dist.is_main():
            (self.out / "training_args.json").write_text(json.dumps(
                {**to_dict(self.model_args, self.data_args, self.ft_args, args, rt, ppo), **self.prec.record()},
                indent=2, ensure_ascii=False))
        with dist.main_process_first():
            self.base_path = resolve_model_path(self.model_args.model_name_or_path)
            self._check_inputs()
            self._setup_data()
        self._setup_schedule()
        self._build_engines()
        torch.manual_seed(args.seed + 1000003 * dist.rank())  # same weights everywhere, different samples per rank
        self.kl_ctl = algo.kl_controller(ppo.init_kl_coef, ppo.target_kl, ppo.kl_horizon)
        self.reward_stats = algo.RunningMoments()
        if self.rm_meta and ppo.normalize_reward and self.rm_meta.get("score_std"):
            self.reward_stats = algo.RunningMoments(self.rm_meta["score_mean"], self.rm_meta["score_std"] ** 2,
                                                    float(self.rm_meta.get("score_count", 256)))
        self.sampling = SamplingSettings(max_new_tokens=ppo.max_new_tokens, eos_token_ids=self.eos_ids,
                                         pad_token_id=self.tokenizer.pad_token_id, temperature=ppo.temperature,
                                         top_p=ppo.top_p, top_k=ppo.top_k)
        self.ema = gather_state_dict(self.actor, trainable_only=True) if ppo.enable_ema else None
        if self.ema is not None:
            self.ema = {k: v.float().clone() for k, v in self.ema.items()}
        self.loop = LoopState()
        if self.resume_from is not None:
            self._resume()
        self.tracker = Tracker(self.out, args.report_to, args.logging_dir, purge_step=self.loop.step + 1)
        self.tracker.log_start(self.prec, self.loop.step)
        self.stop = dist.StopSignal()

    def resume_config(self) -> dict[str, Any]:
        """What a checkpoint must have been written with to continue it (see checkpoint.plan_resume)."""
        a, d, f, p = self.args, self.data_args, self.ft_args, self.ppo
        stages = self._role_stages()
        return {"stage": "ppo", "model": self.model_args.model_name_or_path, "template": self.model_args.template,
                "finetuning_type": f.finetuning_type, "lora_rank": f.lora_rank, "lora_target": f.lora_target,
                "checkpoint_dir": p.checkpoint_dir, "reward_model": p.reward_model, "reward_fn": p.reward_fn,
                "dataset": d.dataset, "eval_dataset": d.eval_dataset, "val_size": d.val_size,
                "max_samples": d.max_samples, "seed": a.seed, "precision": self.precision,
                "per_device_train_batch_size": a.per_device_train_batch_size,
                "gradient_accumulation_steps": a.gradient_accumulation_steps, "ppo_epochs": p.ppo_epochs,
                "max_prompt_length": p.max_prompt_length, "max_new_tokens": p.max_new_tokens,
                "world_size": dist.world_size(), "actor_zero_stage": stages["actor"],
                "critic_zero_stage": stages["critic"]}

    def _resume(self) -> None:
        state = load_resumable(self.resume_from, {"actor": self.actor, "critic": self.critic}, self.universal)
        self.loop = LoopState(**state["loop"])
        if self.universal:  # the same number of prompts seen, in the new layout's order
            self.loop.position = self.loop.position * state["prompts_per_step"] // (
                self.rollout_size * dist.world_size())
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.reward_stats = algo.RunningMoments(**state["reward_stats"])
        if self.ema is not None and dist.is_main():
            self.ema = torch.load(self.resume_from / "ema.pt", weights_only=True)
        truncate_run_logs(self.out, self.loop.step)
        logger.info("resuming from %s: step %d of %d", self.resume_from, self.loop.step, self.total_steps)

    def _check_flags(self) -> None:
        args, ppo = self.args, self.ppo
        if not args.do_train:
            raise UserError("train_ppo.py needs --do_train")
        if not self.data_args.dataset:
            raise UserError("--dataset is required (prompts, e.g. --dataset alpaca_gpt4_zh)")
        if not (ppo.reward_model or ppo.reward_fn):
            raise UserError("give the reward: --reward_model DIR (from train_rm.py) or --reward_fn module:function")
        if args.do_eval and not (self.data_args.val_size or self.data_args.eval_dataset):
            raise UserError("--do_eval needs held-out prompts: give --val_size (e.g. 32) or --eval_dataset")
        rollout = args.per_device_train_batch_size * args.gradient_accumulation_steps
        gen = ppo.per_device_generation_batch_size
        if gen is not None and (gen < 1 or rollout % gen):
            raise UserError(f"--per_device_generation_batch_size {gen} must divide the rollout batch of {rollout} "
                            f"prompts per rank (--per_device_train_batch_size x --gradient_accumulation_steps)")
        if ppo.ptx_coef < 0:
            raise UserError(f"--ptx_coef {ppo.ptx_coef} must be >= 0")

    def _check_inputs(self) -> None:
        """Every model folder and compatibility check, before any engine is built."""
        ppo = self.ppo
        ckpt = ppo.checkpoint_dir
        if ckpt is not None:
            path = Path(ckpt)
            if not path.is_dir():
                raise UserError(f"--checkpoint_dir {ckpt}: no such folder (the --output_dir of train_sft.py)")
            if (path / HEAD_META).is_file():
                raise UserError(f"--checkpoint_dir {ckpt} is a reward/value model; it must be a policy: a LoRA "
                                f"adapter or a causal-LM folder")
            if not (is_adapter_dir(path) or (path / "config.json").is_file()):
                raise UserError(f"--checkpoint_dir {ckpt} holds neither adapter_config.json nor config.json")
        self.policy_source = Path(ckpt) if ckpt and not is_adapter_dir(ckpt) else self.base_path
        self.tokenizer = load_tokenizer(self.policy_source if ckpt and not is_adapter_dir(ckpt) else
                                        (ckpt or self.base_path), padding_side="left")
        self.template = resolve_template(self.tokenizer, self.model_args.template)
        self.eos_ids = eos_token_ids(self.tokenizer, self.policy_source)
        from transformers import AutoConfig

        limit = context_length(AutoConfig.from_pretrained(str(self.policy_source)))
        if limit and ppo.max_prompt_length + ppo.max_new_tokens > limit:
            raise UserError(f"--max_prompt_length {ppo.max_prompt_length} + --max_new_tokens {ppo.max_new_tokens} "
                            f"exceeds the model's context of {limit} tokens; lower one of them")
        self.rm_meta: dict[str, Any] | None = None
        self.reward_fn = None
        if ppo.reward_model:
            if not Path(ppo.reward_model).is_dir():
                raise UserError(f"--reward_model {ppo.reward_model}: no such folder (the --output_dir of "
                                f"train_rm.py)")
            self.rm_meta = read_head_meta(ppo.reward_model)
            rm_tok = load_tokenizer(ppo.reward_model)
            if rm_tok.get_vocab() != self.tokenizer.get_vocab() or rm_tok.eos_token_id != self.tokenizer.eos_token_id:
                raise UserError(f"--reward_model {ppo.reward_model} uses a different tokenizer than the policy "
                                f"{self.model_args.model_name_or_path}; train the reward model on the same base model")
            if self.rm_meta.get("template") != self.template:
                raise UserError(f"--reward_model was trained with the {self.rm_meta.get('template')!r} prompt "
                                f"template but this run uses {self.template!r}; pass --template "
                                f"{self.rm_meta.get('template')}")
        else:
            self.reward_fn = load_reward_fn(ppo.reward_fn)

    def _setup_data(self) -> None:
        d, ppo = self.data_args, self.ppo
        examples = load_examples(d.dataset, "sft", d.dataset_dir, d.dataset_format, d.max_samples, True, self.report)
        if d.eval_dataset:
            train, evaluation = examples, load_examples(d.eval_dataset, "sft", d.dataset_dir, d.dataset_format,
                                                        d.max_samples, True, self.report)
        elif d.val_size:
            train, evaluation = split_eval(examples, d.val_size, self.args.seed)
        else:
            train, evaluation = examples, None
        max_length = ppo.max_prompt_length + ppo.max_new_tokens
        self.train_set = tokenize_prompts(train, self.tokenizer, self.template, ppo.max_prompt_length, max_length,
                                          self.report)
        self.eval_set = (tokenize_prompts(evaluation, self.tokenizer, self.template, ppo.max_prompt_length,
                                          max_length, self.report, name="eval prompts")
                         if evaluation is not None and self.args.do_eval else None)
        self.report.add(f"{len(self.train_set)} training prompts" +
                        (f", {len(self.eval_set)} evaluation prompts" if self.eval_set is not None else ""))

    def _setup_schedule(self) -> None:
        args = self.args
        world = dist.world_size()
        self.rollout_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        columns = self.train_set.select_columns(["prompt_ids", "prompt_text", "input_ids", "prompt_len"])
        self.sampler = train_sampler(self.train_set, self.rollout_size, dist.rank(), world, args.seed, False)
        self.loader = DataLoader(columns, batch_size=self.rollout_size, sampler=self.sampler, drop_last=True,
                                 collate_fn=lambda rows: rows,  # own generator: see trainers/base.py
                                 generator=torch.Generator().manual_seed(args.seed))
        per_epoch = len(self.loader)
        self.total_steps = args.max_steps if args.max_steps > 0 else int(args.num_train_epochs * per_epoch)
        if per_epoch == 0 or self.total_steps < 1:
            raise UserError(f"{len(self.train_set)} prompts are too few for one PPO step of {self.rollout_size * world} "
                            f"(batch {args.per_device_train_batch_size} x accumulation "
                            f"{args.gradient_accumulation_steps} x {world} ranks); lower them or add prompts")
        self.steps_per_epoch = per_epoch
        optimizer_steps = self.total_steps * self.ppo.ppo_epochs
        self.warmup_steps = args.warmup_steps or math.ceil(args.warmup_ratio * optimizer_steps)
        self.optimizer_steps = optimizer_steps
        logger.info("%d PPO steps of %d prompts (%d per rank, %d steps per epoch), %d optimizer steps each",
                    self.total_steps, self.rollout_size * world, self.rollout_size, per_epoch, self.ppo.ppo_epochs)
        if self.fused_experience:
            logger.info("one optimizer step per rollout: the old log-probs and values come from the first training "
                        "forward (--fuse_experience off to compute them in make_experience)")

    # ----------------------------------------------------------------------------------------------- engines
    def _role_stages(self) -> dict[str, int]:
        ppo, rt = self.ppo, self.rt
        actor = ppo.actor_zero_stage or rt.zero_stage
        critic = ppo.critic_zero_stage or rt.zero_stage
        ref = ppo.ref_zero_stage if ppo.ref_zero_stage is not None else (3 if actor == 3 else 0)
        reward = ppo.reward_zero_stage if ppo.reward_zero_stage is not None else (3 if critic == 3 else 0)
        # DeepSpeed offloads parameters only under ZeRO-3, so offloading a frozen model means partitioning it.
        for role, offload in (("reference", ppo.offload_reference_model), ("reward", ppo.offload_reward_model)):
            stage = ref if role == "reference" else reward
            if offload and stage != 3:
                logger.info("--offload_%s_model: the %s engine runs under ZeRO-3 with its parameters in CPU "
                            "memory (DeepSpeed offloads parameters only under ZeRO-3)",
                            "reference" if role == "reference" else "reward", role)
                if role == "reference":
                    ref = 3
                else:
                    reward = 3
        return {"actor": actor, "critic": critic, "reference": ref, "reward": reward}

    def _settings(self, stage: int, lr: float = 0.0, explicit: bool = False) -> EngineSettings:
        a = self.args
        return EngineSettings(micro_batch=a.per_device_train_batch_size, grad_accum=a.gradient_accumulation_steps,
                              precision=self.precision, max_grad_norm=a.max_grad_norm, lr=lr,
                              betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon, weight_decay=a.weight_decay,
                              stage=stage, world_size=dist.world_size(),
                              persistence_threshold=self.rt.stage3_param_persistence_threshold,
                              stage_is_explicit=explicit)

    def _build_engines(self) -> None:
        args, rt, ppo = self.args, self.rt, self.ppo
        stages = self._role_stages()
        actor_lr = ppo.actor_learning_rate or args.learning_rate
        critic_lr = ppo.critic_learning_rate or args.learning_rate
        cfg = {
            "actor": engine_config(self._settings(stages["actor"], actor_lr, ppo.actor_zero_stage is not None),
                                   True, rt.offload, rt.deepspeed),
            "critic": engine_config(self._settings(stages["critic"], critic_lr, ppo.critic_zero_stage is not None),
                                    True, rt.offload, rt.deepspeed),
            "reference": engine_config(self._settings(stages["reference"]), False, ppo.offload_reference_model),
            "reward": engine_config(self._settings(stages["reward"]), False, ppo.offload_reward_model),
        }
        schedule = dict(scheduler_type=args.lr_scheduler_type, warmup_steps=self.warmup_steps,
                        total_steps=self.optimizer_steps)
        if self.universal:
            for role in ("actor", "critic"):
                cfg[role]["checkpoint"] = {"load_universal": True}
            convert_to_universal(self.resume_from, ["actor", "critic"])
        actor = self._load_policy(cfg["actor"], trainable=True)
        if ppo.hybrid_engine == "deepspeed":
            problem = deepspeed_hybrid_problem(actor)
            if problem:
                raise UserError(f"--hybrid_engine deepspeed: {problem}; use --hybrid_engine ours, which works for "
                                f"any causal LM")
            cfg["actor"]["hybrid_engine"] = {"enabled": True, "max_out_tokens": ppo.max_prompt_length +
                                             ppo.max_new_tokens, "inference_tp_size": 1, "pin_parameters": True,
                                             "release_inference_cache": False, "tp_gather_partition_size": 8}
        self.actor = create_train_engine(actor, cfg["actor"], **schedule)
        self.generator = build_generator(self.actor, ppo.hybrid_engine, ppo.hybrid_gather_layers,
                                         ppo.hybrid_merge_lora)
        self.ref = create_inference_engine(self._load_policy(cfg["reference"], trainable=False), cfg["reference"])
        self.critic = create_train_engine(self._load_critic(cfg["critic"]), cfg["critic"], **schedule)
        self.reward = None
        if ppo.reward_model:
            stage3 = cfg["reward"]["zero_optimization"]["stage"] == 3
            model, _ = load_scalar_model(ppo.reward_model, self.dtype, cfg["reward"] if stage3 else None,
                                         merge_lora=not stage3)
            self.reward = create_inference_engine(model, cfg["reward"])
        for role, engine in (("actor", self.actor), ("critic", self.critic), ("reference", self.ref),
                             ("reward", self.reward)):
            if engine is None:
                continue
            trainable, total = count_parameters(engine.module)
            logger.info("%-9s ZeRO-%d %s: %s of %s parameters train", role, engine.zero_optimization_stage(),
                        self.precision, f"{trainable:,}", f"{total:,}")

    def _load_policy(self, ds_config: dict, trainable: bool):
        """The initial policy: base model + the SFT adapter or the SFT folder; the actor also gets its trainable
        weights (it keeps training the SFT adapter when both are LoRA)."""
        from peft import PeftModel

        ckpt = self.ppo.checkpoint_dir
        lora = self.ft_args.finetuning_type == "lora"
        if ckpt and is_adapter_dir(ckpt):
            # The reference keeps the adapter unmerged too: merged into bf16 weights it would compute slightly
            # different log-probs from the actor's, a KL that is not zero before the first update.
            keep_adapter = (trainable and lora) or not trainable
            model = load_causal_lm(self.base_path, self.dtype, ds_config if keep_adapter else None)
            model = PeftModel.from_pretrained(model, ckpt, is_trainable=trainable and lora)
            if not keep_adapter:
                model = model.merge_and_unload()
        else:
            model = load_causal_lm(self.policy_source, self.dtype, ds_config)
        if trainable:
            if not isinstance(model, PeftModel):
                model = apply_finetuning(model, self.ft_args, task_type="CAUSAL_LM")
            if self.ppo.actor_gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable_dropout(model)
        return model

    def _load_critic(self, ds_config: dict) -> ScalarHeadModel:
        """The value model: the reward model by default (its adapter keeps training under LoRA), else the policy's
        base model with a zero value head."""
        lora = self.ft_args.finetuning_type == "lora"
        stage3 = ds_config["zero_optimization"]["stage"] == 3
        if self.ppo.reward_model:
            rm_is_lora = is_adapter_dir(self.ppo.reward_model)
            continue_adapter = lora and rm_is_lora
            model, meta = load_scalar_model(self.ppo.reward_model, self.dtype,
                                            ds_config if (stage3 and (continue_adapter or not rm_is_lora)) else None,
                                            trainable=continue_adapter, merge_lora=rm_is_lora and not continue_adapter)
            self.critic_base = meta["base_model"] if continue_adapter else str(Path(self.ppo.reward_model).resolve())
            if not continue_adapter:
                model.backbone = apply_finetuning(model.backbone, self.ft_args)
        else:
            backbone = apply_finetuning(load_backbone(self.base_path, self.dtype, ds_config), self.ft_args)
            model = ScalarHeadModel(backbone, head_init="zero")
            self.critic_base = self.model_args.model_name_or_path
        for p in model.value_head.parameters():
            p.requires_grad_(True)
        if self.ppo.critic_gradient_checkpointing:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable_dropout(model)
        return model

    # ---------------------------------------------------------------------------------------------- rewards
    def _score(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompts: list[str],
               responses: list[str]) -> torch.Tensor:
        """Raw reward of each sequence: the RM's score at the last real token, or the reward function's value."""
        if self.reward is not None:
            return gather_last(self.reward(input_ids=sequences, attention_mask=attention_mask),
                               attention_mask).float()
        return torch.tensor(call_reward_fn(self.reward_fn, self.ppo.reward_fn, prompts, responses),
                            dtype=torch.float32, device=sequences.device)

    def _decode(self, response: torch.Tensor, mask: torch.Tensor) -> list[str]:
        texts = self.tokenizer.batch_decode([r[m.bool()].tolist() for r, m in zip(response, mask)],
                                            skip_special_tokens=True)
        return [t.rstrip("\ufffd") for t in texts]  # a response cut mid-character ends in a partial byte sequence

    # -------------------------------------------------------------------------------------------- rollout
    def _chunks(self, n: int, size: int) -> list[slice]:
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    @torch.no_grad()
    def _sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingSettings,
                size: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Responses to all prompts, in generate calls of `size` prompts; and the gather / generation seconds."""
        size = size or self.ppo.per_device_generation_batch_size or prompt_ids.shape[0]
        parts, timings = [], {"gather": 0.0, "generation": 0.0}
        for s in self._chunks(prompt_ids.shape[0], size):
            parts.append(self.generator.generate(prompt_ids[s], prompt_mask[s], sampling))
            for key in timings:
                timings[key] += self.generator.timings[key]
        width = max(p.shape[1] for p in parts)
        pad = self.tokenizer.pad_token_id
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad) for p in parts]), timings

    @property
    def fused_experience(self) -> bool:
        """Whether the old log-probs and values come from the first training forward: exact when the rollout makes
        a single optimizer step from a single micro-batch, since the weights have not moved before it (TRL's GRPO
        skips its old log-probs in the same case)."""
        return (self.ppo.fuse_experience == "auto" and self.ppo.ppo_epochs == 1
                and self.args.gradient_accumulation_steps == 1)

    @torch.no_grad()
    def make_experience(self, rows: list[dict]) -> tuple[Rollout, dict[str, float]]:
        """Generate responses to the prompts and score them. The actor's and the critic's forwards (old log-probs,
        values) and the advantages are here too, unless they are fused into the first training forward; then
        train_on completes the rollout and `stats`."""
        device = dist.device()
        prompt_ids, prompt_mask = pad_sequences([r["prompt_ids"] for r in rows], self.tokenizer.pad_token_id, "left")
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        t0 = time.time()
        response, gen_times = self._sample(prompt_ids, prompt_mask, self.sampling)
        t_rollout = time.time() - t0
        mask = algo.response_mask(response, self.eos_ids)
        sequences = torch.cat([prompt_ids, response], 1)
        attention = torch.cat([prompt_mask, mask], 1)
        n = response.shape[1]
        fused = self.fused_experience
        self.actor.eval()
        self.critic.eval()
        logprobs, ref_logprobs, values, scores = [], [], [], []
        responses_text = self._decode(response, mask)
        prompts_text = [r["prompt_text"] for r in rows]
        with plain_linear():  # no backward follows these forwards
            for s in self._chunks(len(rows), self.args.per_device_train_batch_size):
                seq, att = sequences[s], attention[s]
                if not fused:
                    logprobs.append(algo.logprobs_from_logits(response_logits(self.actor, seq, att, n), response[s],
                                                              self.ppo.temperature))
                    values.append(response_values(self.critic, seq, att, n).float())
                ref_logprobs.append(algo.logprobs_from_logits(response_logits(self.ref, seq, att, n), response[s],
                                                              self.ppo.temperature))
                scores.append(self._score(seq, att, prompts_text[s], responses_text[s]))
        self.actor.train()
        self.critic.train()
        scores = torch.cat(scores)
        ended = algo.has_eos(response, mask, self.eos_ids)
        if self.ppo.missing_eos_penalty:
            scores = scores - self.ppo.missing_eos_penalty * (~ended).float()
        if self.ppo.normalize_reward:
            self.reward_stats.update(scores, dist.all_reduce_sum)
            normalized = algo.normalize_scores(scores, self.reward_stats.mean, self.reward_stats.std,
                                               self.ppo.reward_clip)
        else:
            normalized = scores.clamp(-self.ppo.reward_clip, self.ppo.reward_clip) if self.ppo.reward_clip else scores
        rollout = Rollout(prompt_ids, prompt_mask, response, mask, torch.cat(ref_logprobs), scores, normalized,
                          [r["input_ids"] for r in rows], [r["prompt_len"] for r in rows])
        stats = {"reward": scores.mean().item(), "reward_normalized": normalized.mean().item(),
                 "response_length": mask.sum(-1).float().mean().item(), "eos_rate": ended.float().mean().item(),
                 "time_gather": gen_times["gather"], "time_generation": t_rollout - gen_times["gather"],
                 "tokens": mask.sum().item()}
        if not fused:
            self.complete_rollout(rollout, torch.cat(logprobs), torch.cat(values), stats)
        stats["time_experience"] = time.time() - t0 - t_rollout
        self._last_texts = (prompts_text, responses_text, scores.tolist())
        return rollout, stats

    @torch.no_grad()
    def complete_rollout(self, ro: Rollout, logprobs: torch.Tensor, values: torch.Tensor, stats: dict) -> None:
        """Where the KL is added: the per-token reward is -kl_coef * KL(actor || reference), plus the normalised
        score at the last response token; GAE turns rewards and the critic's values into advantages and returns."""
        ppo, mask = self.ppo, ro.mask
        ro.logprobs, ro.values = logprobs, values.float() * mask
        ro.rewards, ro.kl = algo.compute_rewards(ro.normalized, logprobs, ro.ref_logprobs, mask, self.kl_ctl.value,
                                                 ppo.kl_estimator)
        advantages, ro.returns = algo.ADVANTAGE_ESTIMATORS["gae"](ro.rewards, ro.values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            totals = dist.all_reduce_sum(torch.stack([mask.sum(), (advantages * mask).sum(),
                                                      (advantages ** 2 * mask).sum()]).double().cpu())
            count, total, total_sq = totals.tolist()
            mean = total / max(count, 1)
            var = max(total_sq / max(count, 1) - mean ** 2, 0.0) * count / max(count - 1, 1)
            advantages = algo.masked_whiten(advantages, mask, stats=(torch.tensor(mean), torch.tensor(var)))
        ro.advantages = advantages
        seq_kl = algo.masked_sum(algo.kl_k1(logprobs, ro.ref_logprobs), mask, dim=-1)
        stats.update(kl=seq_kl.mean().item(),
                     value_explained_variance=algo.explained_variance(ro.values, ro.returns, mask).item())

    # ------------------------------------------------------------------------------------------- training
    def _ptx_loss(self, mb: Rollout) -> torch.Tensor:
        batch = SFTCollator(self.tokenizer.pad_token_id)([{"input_ids": ids, "prompt_len": n}
                                                          for ids, n in zip(mb.ptx_ids, mb.ptx_prompt_len)])
        batch = {k: v.to(dist.device()) for k, v in batch.items()}
        out = self.actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False)
        return sft_loss(out.logits, batch["input_ids"], batch["loss_mask"])

    def train_on(self, ro: Rollout, stats: dict | None = None) -> dict[str, float]:
        """PPO updates of the actor and the critic on one rollout. A rollout from a fused make_experience is
        completed here from the first forwards, and `stats` (make_experience's) with it."""
        ppo = self.ppo
        n = ro.response.shape[1]
        sums: dict[str, float] = {}
        count = 0
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(ro.response.shape[0])
            for s in self._chunks(len(order), self.args.per_device_train_batch_size):
                fused = ro.advantages is None  # then this single micro-batch is the whole rollout
                mb = ro if fused else ro.select(order[s])
                seq, att = mb.sequences, mb.attention_mask
                values = response_values(self.critic, seq, att, n) if fused else None
                logits = response_logits(self.actor, seq, att, n)
                logprobs = algo.logprobs_from_logits(logits, mb.response, ppo.temperature)
                if fused:
                    self.complete_rollout(ro, logprobs.detach(), values.detach(), stats)
                pg_loss, pg_stats = algo.policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, ppo.cliprange)
                with torch.no_grad():
                    entropy = algo.masked_mean(algo.entropy_from_logits(logits, ppo.temperature), mb.mask)
                loss = pg_loss
                step_stats = {"policy_loss": pg_loss.item(), "entropy": entropy.item(), **{
                    k: v.item() for k, v in pg_stats.items()}}
                if ppo.ptx_coef > 0:
                    ptx = self._ptx_loss(mb)
                    loss = loss + ppo.ptx_coef * ptx
                    step_stats["ptx_loss"] = ptx.item()
                self.actor.backward(loss)
                self.actor.step()
                if values is None:
                    values = response_values(self.critic, seq, att, n)
                v_loss, v_stats = algo.value_loss(values, mb.values, mb.returns, mb.mask, ppo.cliprange_value)
                self.critic.backward(ppo.vf_coef * v_loss)
                self.critic.step()
                step_stats.update(value_loss=v_loss.item(), **{k: v.item() for k, v in v_stats.items()})
                for k, v in step_stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
            self._update_ema()
        keys = sorted(sums)
        means = dist.all_reduce_mean(torch.tensor([sums[k] / count for k in keys], dtype=torch.float64))
        return dict(zip(keys, means.tolist()))

    def _update_ema(self) -> None:
        if not self.ppo.enable_ema:
            return
        current = gather_state_dict(self.actor, trainable_only=True)
        if current is not None and self.ema is not None:
            beta = self.ppo.ema_beta
            for k, v in current.items():
                self.ema[k].mul_(beta).add_(v.float(), alpha=1 - beta)

    # ---------------------------------------------------------------------------------------- the loop
    def train(self) -> None:
        args, ppo, loop = self.args, self.ppo, self.loop
        bar = progress(self.total_steps, "PPO", disable=self.rt.disable_tqdm, initial=loop.step)
        t_start = time.time()
        if self.eval_set is not None and loop.step == 0:
            self.evaluate(0)
        while loop.step < self.total_steps:
            self.sampler.set_epoch(loop.epoch)
            for rows in itertools.islice(self.loader, loop.position, None):  # a resumed epoch skips what was done
                if loop.step >= self.total_steps:
                    break
                loop.step += 1
                loop.position += 1
                step = loop.step
                t0 = time.time()
                rollout, stats = self.make_experience(rows)
                t1 = time.time()
                train_stats = self.train_on(rollout, stats)
                t_train = time.time() - t1
                self.kl_ctl.update(dist.all_reduce_mean(torch.tensor([stats["kl"]]))[0].item(),
                                   self.rollout_size * dist.world_size())
                self._log_step(step, loop.epoch, stats, train_stats, t_train, time.time() - t0, bar)
                if step % args.logging_steps == 0 or step == 1:
                    self._log_samples(step)
                if self.eval_set is not None and step % ppo.eval_steps == 0 and step < self.total_steps:
                    self.evaluate(step)
                stop = self.stop.requested()
                if stop or (args.save_steps and step % args.save_steps == 0 and step < self.total_steps):
                    loop.runtime += time.time() - t_start
                    t_start = time.time()
                    self.save_checkpoint(step)
                die_if_asked("step", step)
                if stop:
                    bar.close()
                    raise Preempted(f"{self.stop.describe()} received: checkpoint saved at step {step} in {self.out}")
            if loop.step < self.total_steps or loop.position >= self.steps_per_epoch:
                loop.epoch += 1
                loop.position = 0
        bar.close()
        loop.runtime += time.time() - t_start
        if self.eval_set is not None:
            self.evaluate(loop.step)

    def _log_step(self, step: int, epoch: int, stats: dict, train_stats: dict, t_train: float, t_total: float,
                  bar) -> None:
        local = {k: v for k, v in stats.items() if k != "tokens"}
        keys = sorted(local)
        means = dist.all_reduce_mean(torch.tensor([local[k] for k in keys], dtype=torch.float64))
        row = dict(zip(keys, means.tolist()))
        tokens = dist.all_reduce_sum(torch.tensor([stats["tokens"]], dtype=torch.float64))[0].item()
        row.update(train_stats)
        row.update(kl_coef=self.kl_ctl.value, time_training=t_train, tokens_per_second=tokens / t_total,
                   learning_rate=self.actor.get_lr()[0], critic_learning_rate=self.critic.get_lr()[0],
                   epoch=epoch + (step - epoch * self.steps_per_epoch) / self.steps_per_epoch)
        share = row["time_generation"] / t_total if t_total else 0.0
        row["generation_share"] = share
        row["time_step"] = t_total
        self.tracker.log(row, step)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.3f}")
        if step % self.args.logging_steps == 0 or step == 1 or step == self.total_steps:
            logger.info("step %d/%d %s", step, self.total_steps, format_metrics(row, (
                "reward", "reward_normalized", "kl", "kl_coef", "response_length", "eos_rate", "policy_loss",
                "value_loss", "entropy", "clipfrac", "approx_kl")))
            logger.info("step %d: E2E latency=%.2fs | Gather latency=%.2fs | Generate time=%.2fs (%.1f%%) | "
                        "Experience time=%.2fs | Training time=%.2fs (%.1f%%) | %.1f tokens/s", step, t_total,
                        row["time_gather"], row["time_generation"], 100 * share, row["time_experience"], t_train,
                        100 * t_train / t_total if t_total else 0.0, row["tokens_per_second"])

    def _log_samples(self, step: int) -> None:
        if not dist.is_main() or self.ppo.num_samples_to_log <= 0:
            return
        prompts, responses, scores = self._last_texts
        with open(self.out / "samples.jsonl", "a", encoding="utf-8") as f:
            for p, r, s in list(zip(prompts, responses, scores))[: self.ppo.num_samples_to_log]:
                f.write(json.dumps({"step": step, "prompt": p, "response": r, "reward": s}, ensure_ascii=False)
                        + "\n")

    # ------------------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy answers to the held-out prompts: reward, KL to the reference, length, EOS rate, and the win rate
        against the dataset's reference answers as judged by the reward."""
        device = dist.device()
        greedy = SamplingSettings(max_new_tokens=self.ppo.max_new_tokens, eos_token_ids=self.eos_ids,
                                  pad_token_id=self.tokenizer.pad_token_id, do_sample=False)
        found: dict[int, tuple[float, float, float, float, float]] = {}
        texts: dict[int, dict[str, Any]] = {}  # the first prompts, kept with their answers for eval_samples.jsonl
        batches = even_shards(len(self.eval_set), dist.rank(), dist.world_size(), self.rt.per_device_eval_batch_size)
        self.actor.eval()
        bar = progress(len(batches), f"evaluating (step {step})", disable=self.rt.disable_tqdm, unit="batch")
        for indices, n_real in batches:
            rows = [self.eval_set[i] for i in indices]
            prompt_ids, prompt_mask = pad_sequences([r["prompt_ids"] for r in rows], self.tokenizer.pad_token_id,
                                                    "left")
            prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
            response, _ = self._sample(prompt_ids, prompt_mask, greedy, size=prompt_ids.shape[0])
            mask = algo.response_mask(response, self.eos_ids)
            seq, att = torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, mask], 1)
            n = response.shape[1]
            logp = algo.logprobs_from_logits(response_logits(self.actor, seq, att, n), response)
            ref_logp = algo.logprobs_from_logits(response_logits(self.ref, seq, att, n), response)
            kl = algo.masked_sum(logp - ref_logp, mask, dim=-1)
            prompts = [r["prompt_text"] for r in rows]
            decoded = self._decode(response, mask)
            score = self._score(seq, att, prompts, decoded)
            ref_ids, ref_att = pad_sequences([r["input_ids"] for r in rows], self.tokenizer.pad_token_id, "left")
            answers = [self.tokenizer.decode(r["input_ids"][r["prompt_len"]:], skip_special_tokens=True) for r in rows]
            ref_score = self._score(ref_ids.to(device), ref_att.to(device), prompts, answers)
            ended = algo.has_eos(response, mask, self.eos_ids).float()
            for k in range(n_real):
                found[indices[k]] = (score[k].item(), ref_score[k].item(), kl[k].item(),
                                     mask[k].sum().item(), ended[k].item())
                if indices[k] < self.ppo.num_samples_to_log:
                    texts[indices[k]] = {"step": step, "prompt": prompts[k], "response": decoded[k],
                                         "reward": score[k].item(), "reference": answers[k],
                                         "reference_reward": ref_score[k].item()}
            bar.update(1)
        bar.close()
        self.actor.train()
        for part in dist.all_gather_object(found):
            found.update(part)
        for part in dist.all_gather_object(texts):
            texts.update(part)
        rows = list(found.values())
        wins = [1.0 if s > r else 0.5 if s == r else 0.0 for s, r, *_ in rows]
        result = {"step": step, "eval_reward": sum(r[0] for r in rows) / len(rows),
                  "eval_reference_reward": sum(r[1] for r in rows) / len(rows),
                  "eval_kl": sum(r[2] for r in rows) / len(rows),
                  "eval_response_length": sum(r[3] for r in rows) / len(rows),
                  "eval_eos_rate": sum(r[4] for r in rows) / len(rows),
                  "eval_win_rate": sum(wins) / len(wins), "eval_samples": len(rows)}
        if dist.is_main():
            with open(self.out / "eval_results.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
            with open(self.out / "eval_samples.jsonl", "a", encoding="utf-8") as f:
                for index in sorted(texts):
                    f.write(json.dumps({"index": index, **texts[index]}, ensure_ascii=False) + "\n")
        self.tracker.log({k: v for k, v in result.items() if k != "step"}, step, kind="eval")
        logger.info("eval at step %d: %s", step, format_metrics(result, (
            "eval_reward", "eval_win_rate", "eval_kl", "eval_response_length", "eval_eos_rate")))
        return result

    # ------------------------------------------------------------------------------------------------ save
    def _write_models(self, dest: Path, actor_state, critic_state, ema_state, merged: bool = True) -> None:
        """Rank 0: actor (adapter or full), actor_merged (LoRA; not in checkpoints, where export.py makes it from
        actor/ when asked: it is a whole model, about 1 GB for the default one), actor_ema, critic into dest."""
        from peft import PeftModel

        actor = self.actor.module
        dest.mkdir(parents=True, exist_ok=True)
        for name, state in (("actor", actor_state), ("actor_ema", ema_state)):
            if state is None:
                continue
            state = {k: v.to(self.dtype) for k, v in state.items()}
            save_causal_lm(actor, state, dest / name, self.tokenizer)
            if merged and isinstance(actor, PeftModel):
                export_merged_lora(self.base_path if self.ppo.checkpoint_dir is None or
                                   is_adapter_dir(self.ppo.checkpoint_dir) else self.policy_source,
                                   actor.peft_config["default"], state, dest / f"{name}_merged", self.tokenizer,
                                   self.dtype)
        meta = {"kind": "value", "base_model": self.critic_base, "finetuning_type": self.ft_args.finetuning_type,
                "template": self.template, "max_length": self.ppo.max_prompt_length + self.ppo.max_new_tokens,
                "precision": self.precision, "rlhf_ds_version": rlhf_ds.__version__}
        save_scalar_model(self.critic.module, critic_state, dest / "critic", meta, self.tokenizer)

    def _gather_all(self):
        actor_state = gather_state_dict(self.actor, trainable_only=is_peft(self.actor.module))
        critic_state = gather_state_dict(self.critic, trainable_only=is_lora(self.critic.module))
        return actor_state, critic_state

    def save_checkpoint(self, step: int) -> None:
        """A resumable checkpoint OUT/checkpoints/step-N: both training engines' DeepSpeed state, the loop, the
        KL controller, the reward statistics, the EMA and the RNG, with the models as plain folders beside."""
        def write_models(folder: Path) -> None:
            actor_state, critic_state = self._gather_all()
            if dist.is_main():
                self._write_models(folder, actor_state, critic_state, self.ema, merged=False)
                if self.ema is not None:
                    torch.save(self.ema, folder / "ema.pt")

        state = {"loop": asdict(self.loop), "config": self.resume_config(), "kl_controller": self.kl_ctl.state_dict(),
                 "reward_stats": asdict(self.reward_stats), "prompts_per_step": self.rollout_size * dist.world_size(),
                 "total_steps": self.total_steps}
        save_resumable(self.out, step, {"actor": self.actor, "critic": self.critic}, state, write_models,
                       self.args.save_total_limit)

    def save(self) -> None:
        actor_state, critic_state = self._gather_all()
        if dist.is_main():
            results = {"train_runtime": self.loop.runtime, "train_steps": self.loop.step}

            def write(tmp: Path) -> None:
                self._write_models(tmp, actor_state, critic_state, self.ema)
                (tmp / FINISHED_MARKER).write_text(json.dumps(results, indent=2))

            publish_files(write, self.out, marker=FINISHED_MARKER)
            logger.info("PPO done in %.1f s; actor, critic saved to %s", self.loop.runtime, self.out)
        dist.barrier()

    def cleanup(self) -> None:
        self.tracker.close()


def is_peft(module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def main(argv: list[str] | None = None) -> int:
    groups = parse_args(ModelArguments, DataArguments, FinetuningArguments, TrainingArguments, RuntimeArguments,
                        PPOArguments, argv=argv)
    trainer = PPOTrainer(*groups)
    trainer.setup()
    trainer.train()
    trainer.save()
    trainer.cleanup()
    return 0
