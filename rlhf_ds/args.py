"""Every command-line flag, defined once as dataclass fields and shared by the stages.

Each group checks its own values; a stage parses the groups it needs with `flag_parsing.parse_args(Groups...,
argv=...)`, where the first argument may be a YAML or JSON file of flag values that later flags override.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_ds.errors import UserError
from rlhf_ds.flag_parsing import check_choice, check_range

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def shipped_dir(name: str) -> Path:
    """A folder shipped with rlhf_ds (data, ds_configs): at the repository root in a source checkout (and an
    editable install); inside the package (rlhf_ds/_shipped/NAME) when installed from a wheel."""
    installed = PACKAGE_DIR / "_shipped" / name
    return installed if installed.is_dir() else REPO_ROOT / name


DEFAULT_DATASET_DIR = str(shipped_dir("data"))
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MAX_LENGTH = 1024

FINETUNING_TYPES = ("lora", "full", "freeze")
TEMPLATES = ("auto", "chat", "plain")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "A local Hugging Face folder, a hub name already in the local cache, or a built-in "
                          "name (see `python -m rlhf_ds.models.builtin --list`)."},
    )
    template: str = field(
        default="auto",
        metadata={"help": "Prompt format: 'chat' (the tokenizer's chat template), 'plain' (Human:/Assistant:), "
                          "or 'auto' (chat when the tokenizer has one, else plain)."},
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})

    def __post_init__(self) -> None:
        check_choice("template", self.template, TEMPLATES)


@dataclass
class DataArguments:
    dataset: str | None = field(
        default=None,
        metadata={"help": "Registered names from data/dataset_info.json or paths to .json/.jsonl files, "
                          "comma-separated to mix several."},
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "Evaluate on these datasets instead of a split of --dataset."}
    )
    dataset_dir: str = field(default=DEFAULT_DATASET_DIR, metadata={"help": "Folder of dataset_info.json."})
    dataset_format: str | None = field(
        default=None,
        metadata={"help": "Format of unregistered files: ranked, pairwise, dialogue, alpaca or qa (default: detect)."},
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Longest prompt+response in tokens, prompts cut from the left (default "
                                        "1024 for training; a trained model's own setting when evaluating)."}
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many records of each dataset (first N)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "At most this many records of each --eval_dataset (default: --max_samples)."}
    )
    val_size: float = field(
        default=0.0, metadata={"help": "Held-out evaluation split: a fraction (<1) or a number of examples."}
    )
    keep_ties: bool = field(
        default=False, metadata={"help": "Keep preference pairs whose two answers are identical."}
    )
    max_answers_per_record: int = field(
        default=10, metadata={"help": "A ranked record with more answers contributes the pairs among its best N "
                                      "only (N answers make N(N-1)/2 pairs); counted and reported."}
    )

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 8:
            raise UserError(f"--max_length {self.max_length} is too small; use at least 8 tokens")
        if self.val_size < 0:
            raise UserError(f"--val_size {self.val_size} must be >= 0 (a fraction below 1 or a count)")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"--max_samples {self.max_samples} must be >= 1")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise UserError(f"--max_eval_samples {self.max_eval_samples} must be >= 1")
        check_range("max_answers_per_record", self.max_answers_per_record, low=2)

    def eval_samples(self) -> int | None:
        """How many records of each --eval_dataset to read."""
        return self.max_eval_samples if self.max_eval_samples is not None else self.max_samples


@dataclass
class FinetuningArguments:
    finetuning_type: str = field(default="lora", metadata={"help": "lora, full, or freeze (train the last layers)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * rank)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})
    lora_target: str = field(
        default="all",
        metadata={"help": "Comma-separated module names to adapt, or 'all' for every linear layer of the backbone."},
    )
    num_layer_trainable: int = field(
        default=2, metadata={"help": "With --finetuning_type freeze: how many of the last layers train."}
    )

    def __post_init__(self) -> None:
        check_choice("finetuning_type", self.finetuning_type, FINETUNING_TYPES)
        if self.lora_rank < 1:
            raise UserError(f"--lora_rank {self.lora_rank} must be >= 1")
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank
        check_range("lora_alpha", self.lora_alpha, low=0, low_open=True)
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout {self.lora_dropout} must be in [0, 1)")
        if self.num_layer_trainable < 1:
            raise UserError(f"--num_layer_trainable {self.num_layer_trainable} must be >= 1")


@dataclass
class TrainingArguments:
    output_dir: str = field(default="", metadata={"help": "Where the model, logs and results are written."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a finished run in --output_dir."})
    do_train: bool = field(default=False, metadata={"help": "Train."})
    do_eval: bool = field(default=False, metadata={"help": "Evaluate at the end (needs --val_size or --eval_dataset)."})
    eval_before_train: bool = field(default=False, metadata={"help": "With --do_eval, also evaluate before training "
                                                                     "(results as init_eval_*; on by default for "
                                                                     "the online trainers)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Examples per rank per micro-step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs; fractions are allowed."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (overrides epochs)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "|".join(SCHEDULERS)})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warm-up as a fraction of all steps."})
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps (overrides --warmup_ratio)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    save_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N optimizer steps "
                                                           "(0: never)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest K checkpoints."})
    resume: str = field(default="auto", metadata={"help": "auto: continue from the newest checkpoint in "
                                                          "--output_dir if there is one; or a checkpoint path."})
    universal_checkpoint: bool = field(default=False, metadata={"help": "Resume on a different number of ranks "
                                                                        "or ZeRO stage (DeepSpeed's universal "
                                                                        "checkpoint conversion)."})
    seed: int = field(default=42, metadata={"help": "Seed for data order, initialisation and dropout."})
    group_by_length: bool = field(default=True, metadata={"help": "Batch examples of similar length together "
                                                                  "(less padding; still shuffled)."})
    eval_steps: int = field(default=0, metadata={"help": "With --do_eval, also evaluate every N steps (0: at the "
                                                          "end only; the online trainers default to 50)."})
    report_to: str = field(default="none", metadata={"help": "Extra tracker: none or tensorboard."})
    logging_dir: str | None = field(default=None, metadata={"help": "TensorBoard folder (default OUTPUT/runs)."})
    plot_loss: bool = field(default=False, metadata={"help": "Write training_loss.png at the end."})

    def __post_init__(self) -> None:
        check_choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        check_choice("report_to", self.report_to, ("none", "tensorboard"))
        if self.eval_steps < 0:
            raise UserError(f"--eval_steps {self.eval_steps} must be >= 0")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)} must be >= 1")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise UserError("nothing to train: give --num_train_epochs > 0 or --max_steps > 0")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise UserError(f"--save_total_limit {self.save_total_limit} must be >= 1")
        check_range("warmup_ratio", self.warmup_ratio, 0, 1, high_open=True)
        check_range("learning_rate", self.learning_rate, low=0, low_open=True)
        check_range("weight_decay", self.weight_decay, low=0)
        check_range("adam_beta1", self.adam_beta1, 0, 1, high_open=True)
        check_range("adam_beta2", self.adam_beta2, 0, 1, high_open=True)
        check_range("adam_epsilon", self.adam_epsilon, low=0, low_open=True)
        check_range("max_grad_norm", self.max_grad_norm, low=0)
        check_range("num_train_epochs", self.num_train_epochs, low=0)
        for name in ("warmup_steps", "save_steps"):
            check_range(name, getattr(self, name), low=0)


@dataclass
class RuntimeArguments:
    """How engines run: precision, ZeRO, offload, evaluation batch, timeouts. Shared by training and evaluation."""

    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Examples per rank per evaluation step."})
    fp16: bool = field(default=False, metadata={"help": "Mixed precision where the hardware does it fast: fp16 on a "
                                                        "GPU; on a CPU bf16 where it has native bf16 kernels, else "
                                                        "fp32 (see docs/precision.md)."})
    bf16: bool = field(default=False, metadata={"help": "Mixed precision where the hardware does it fast: bf16 (fp16 "
                                                        "with loss scaling on GPUs without bf16; fp32 on CPUs "
                                                        "without native bf16 kernels)."})
    precision: str | None = field(default=None, metadata={"help": "bf16, fp16 or fp32 exactly as given, whatever "
                                                                  "the hardware (overrides the choice --bf16 and "
                                                                  "--fp16 make)."})
    deepspeed: str | None = field(default=None, metadata={"help": "Your own DeepSpeed JSON config ('auto' values "
                                                                  "are filled from these flags)."})
    zero_stage: int = field(default=2, metadata={"help": "ZeRO stage of the shipped configs: 2 or 3."})
    offload: bool = field(default=False, metadata={"help": "Offload optimizer state (and, with ZeRO-3, "
                                                           "parameters) to CPU memory."})
    stage3_param_persistence_threshold: int = field(
        default=10000, metadata={"help": "ZeRO-3 keeps parameters smaller than this whole on every rank (the "
                                         "shipped configs' \"auto\"); 0 partitions everything."})
    dist_timeout: int = field(default=1800, metadata={"help": "Seconds a collective may wait before failing."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})

    def __post_init__(self) -> None:
        if self.stage3_param_persistence_threshold < 0:
            raise UserError("--stage3_param_persistence_threshold must be >= 0")
        if self.zero_stage not in (0, 2, 3):
            raise UserError(f"--zero_stage {self.zero_stage}: choose 2 or 3 (0 for evaluation only)")
        if self.per_device_eval_batch_size < 1:
            raise UserError(f"--per_device_eval_batch_size {self.per_device_eval_batch_size} must be >= 1")
        check_range("dist_timeout", self.dist_timeout, low=1)
        if self.fp16 and self.bf16:
            raise UserError("--fp16 and --bf16 are exclusive; pick one")
        if self.precision is not None:
            check_choice("precision", self.precision, ("bf16", "fp16", "fp32"))
        if self.deepspeed and not os.path.isfile(self.deepspeed):
            raise UserError(f"--deepspeed {self.deepspeed}: no such file")



LENGTH_DEBIAS = ("none", "odin", "balanced", "regress", "length_negatives")


def length_debias_parts(value: str) -> set[str]:
    """--length_debias as the set of methods it names: `regress` may be joined to another with `+`."""
    return set(value.split("+"))


def check_length_debias(value: str) -> None:
    parts = value.split("+")
    for part in parts:
        check_choice("length_debias", part, LENGTH_DEBIAS)
    if len(parts) > 1 and (len(parts) != 2 or parts[1] != "regress" or parts[0] in ("none", "regress")):
        raise UserError(f"--length_debias {value!r}: only regress composes, after one other method "
                        f"(e.g. length_negatives+regress)")


@dataclass
class RewardArguments:
    """How the reward-model stage keeps answer length from doing the judging (docs/reward-length.md)."""

    length_debias: str = field(default="length_negatives+regress", metadata={
        "help": "length_negatives+regress (the default, chosen by measurement: docs/length-bias.md): good answers "
                "padded with repeated or unrelated text are added as rejected answers, then the part of the score "
                "that answer length still predicts is taken off and stored with the model. Or one method alone: "
                "none (the plain Bradley-Terry RM); odin (a second head absorbs length, decorrelated from the "
                "reward PPO reads); balanced (pairs weighted so that chosen-shorter and chosen-longer pairs count "
                "alike); regress; length_negatives. regress composes with one other method with +."})
    odin_coef: float = field(default=1.0, metadata={"help": "odin: the weight of the correlation and "
                                                            "orthogonality terms."})
    negatives_share: float = field(default=1.0, metadata={"help": "length_negatives: padded pairs added, as a "
                                                                  "share of the training pairs (1.0 measured best "
                                                                  "of 0.5 and 1.0: docs/length-bias.md)."})

    def __post_init__(self) -> None:
        check_length_debias(self.length_debias)
        check_range("odin_coef", self.odin_coef, low=0)
        check_range("negatives_share", self.negatives_share, 0, 1)


@dataclass
class PolicyArguments:
    """Where a trained policy starts and its frozen reference: shared by the online trainers and DPO."""

    sft_model: str | None = field(default=None, metadata={
        "aliases": ["--checkpoint_dir"],
        "help": "Where the policy starts: the SFT stage's output, a LoRA adapter (trained further) or a full model "
                "folder (default: --model_name_or_path itself). --checkpoint_dir is the recipe's old spelling."})
    ref_zero_stage: int | None = field(default=None, metadata={"help": "The reference's ZeRO stage (0: a full copy "
                                                                       "per rank, 3: partitioned); default 3 if the "
                                                                       "policy's is 3, else 0."})
    offload_reference_model: bool = field(default=False, metadata={"help": "Reference parameters in CPU memory "
                                                                           "(with ZeRO-3)."})

    def __post_init__(self) -> None:
        if self.ref_zero_stage is not None and self.ref_zero_stage not in (0, 3):
            raise UserError(f"--ref_zero_stage {self.ref_zero_stage}: choose 0 (a full copy per rank) or 3 "
                            f"(partitioned)")


@dataclass
class OnlineArguments:
    """The online RL trainers (PPO, GRPO, RLOO, REINFORCE++): their models, per-role memory controls, sampling,
    rewards, and the algorithm's coefficients. train_ppo.py and train_grpo.py differ only in their defaults."""

    reward_model: str | None = field(default=None, metadata={"help": "A folder written by train_rm.py."})
    reward_fn: str | None = field(default=None, metadata={
        "help": "Reward functions, comma-separated: built-in names (math, format; see rlhf_ds/rewards.py) or "
                "module:function / file.py:function taking (prompt, response[, reference])."})
    reward_weights: str | None = field(default=None, metadata={
        "help": "Comma-separated weights of the rewards summed into one score: the reward model first (if any), "
                "then each --reward_fn in order (default: all 1)."})
    advantage_estimator: str = field(default="gae", metadata={
        "help": "gae (PPO, with a critic), grpo, dr_grpo, rloo, reinforce_pp or reinforce_pp_baseline (no critic)."})
    n_samples_per_prompt: int = field(default=1, metadata={
        "help": "Answers drawn per prompt in one generation call; a group's answers stay on one rank."})
    policy_loss: str = field(default="ppo", metadata={"help": "ppo (clipped) or vanilla (policy gradient)."})
    loss_agg: str = field(default="token_mean", metadata={
        "help": "token_mean, seq_mean_token_mean or seq_mean_token_sum (no length normalisation, as Dr. GRPO)."})
    actor_learning_rate: float | None = field(default=None, metadata={"help": "Default: --learning_rate."})
    critic_learning_rate: float | None = field(default=None, metadata={"help": "Default: --learning_rate."})
    actor_zero_stage: int | None = field(default=None, metadata={"help": "2 or 3 (default --zero_stage)."})
    critic_zero_stage: int | None = field(default=None, metadata={"help": "2 or 3 (default --zero_stage)."})
    reward_zero_stage: int | None = field(default=None, metadata={"help": "Default: 3 if the critic's (or, "
                                                                          "without a critic, the actor's) is 3, "
                                                                          "else 0."})
    offload_reward_model: bool = field(default=False, metadata={"help": "Reward-model parameters in CPU memory "
                                                                        "(with ZeRO-3)."})
    actor_gradient_checkpointing: bool = False
    critic_gradient_checkpointing: bool = False
    max_prompt_length: int = field(default=512, metadata={"help": "Prompt tokens kept (cut from the left)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest response."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use it too)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    per_device_generation_batch_size: int | None = field(
        default=None, metadata={"help": "Prompts per generate call (default: the whole rollout batch of "
                                        "per_device_train_batch_size x gradient_accumulation_steps)."})
    ppo_epochs: int = field(default=1, metadata={"help": "Passes over each rollout batch (one optimizer step "
                                                         "each)."})
    fuse_experience: str = field(default="auto", metadata={
        "help": "auto: when a rollout makes one optimizer step from one micro-batch (--ppo_epochs 1, "
                "--gradient_accumulation_steps 1), take the actor's old log-probs and the critic's old values from "
                "the first training forward (detached; the weights have not moved yet) instead of two more forwards. "
                "off: always run those forwards."})
    kl_estimator: str = field(default="k1", metadata={"help": "Per-token KL estimate: k1, k2 or k3."})
    kl_in_loss: bool = field(default=False, metadata={"help": "The KL penalty in the policy loss (as GRPO) instead "
                                                              "of in the per-token reward (as PPO)."})
    init_kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient (initial if adaptive); 0 "
                                                                "builds no reference engine."})
    target_kl: float | None = field(default=None, metadata={"help": "Adapt the coefficient towards this KL per "
                                                                    "response (off: fixed)."})
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL horizon in samples."})
    gamma: float = field(default=1.0, metadata={"help": "Discount (GAE, REINFORCE++)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_advantages: bool = field(default=True, metadata={"help": "GAE: normalise advantages over the rollout "
                                                                    "batch (all ranks)."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip (both bounds)."})
    cliprange_low: float | None = field(default=None, metadata={"help": "Lower ratio bound 1 - this (default "
                                                                        "--cliprange)."})
    cliprange_high: float | None = field(default=None, metadata={"help": "Upper ratio bound 1 + this (default "
                                                                         "--cliprange; DAPO's clip-higher uses "
                                                                         "0.28)."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip around the rollout's values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value-loss weight."})
    normalize_reward: bool = field(default=True, metadata={"help": "Standardise scores with running statistics "
                                                                   "(started from the RM's stored mean/std)."})
    reward_clip: float = field(default=10.0, metadata={"help": "Clip the (normalised) scores to +-this (0: off)."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the score of a "
                                                                              "response that never emits EOS."})
    overlong_buffer: int = field(default=0, metadata={"help": "DAPO's soft overlong penalty: answers longer than "
                                                              "--max_new_tokens minus this lose up to "
                                                              "--overlong_penalty, linearly (0: off)."})
    overlong_penalty: float = field(default=1.0, metadata={"help": "The most the overlong penalty subtracts."})
    length_penalty: float = field(default=0.0, metadata={"help": "Subtracted from the score per answer token: a "
                                                                 "length-penalised reward (0: off)."})
    max_length_growth: float | None = field(default=None, metadata={
        "help": "Stop the run, with a warning and the figures, when the mean answer length of the last 3 steps has "
                "grown by more than this share over that of the first 3 steps while the reward rose (e.g. 0.5)."})
    drop_uniform_groups: bool = field(default=False, metadata={"help": "Leave out of the update the groups whose "
                                                                       "answers all got the same score (no signal; "
                                                                       "counted in metrics.jsonl)."})
    ptx_coef: float = field(default=0.0, metadata={"help": "Weight of the supervised loss on the dataset's "
                                                           "reference answers in the actor loss (PPO-ptx)."})
    enable_ema: bool = field(default=False, metadata={"help": "Keep an exponential moving average of the actor."})
    ema_beta: float = field(default=0.992, metadata={"help": "EMA decay per optimizer step."})
    num_samples_to_log: int = field(default=2, metadata={"help": "Responses written to samples.jsonl per log."})
    hybrid_engine: str = field(default="on", metadata={"help": "Actor generation: on (rlhf_ds's hybrid engine: "
                                                              "gather once, no ZeRO hooks, merged LoRA; 'ours' is "
                                                              "accepted), deepspeed (DeepSpeed's own, CUDA and a "
                                                              "few architectures only) or off."})
    hybrid_gather_layers: int = field(default=0, metadata={"help": "ZeRO-3: gather this many layers at a time "
                                                                   "while generating (0: the whole model once)."})
    hybrid_merge_lora: str = field(default="auto", metadata={"help": "Merge LoRA into the weights while "
                                                                     "generating: on, off, or auto (when a call "
                                                                     "generates at least 128 tokens in all)."})

    def __post_init__(self) -> None:
        from rlhf_ds.algo.advantages import ADVANTAGE_ESTIMATORS
        from rlhf_ds.algo.kl import KL_ESTIMATORS
        from rlhf_ds.algo.policy import LOSS_AGGREGATIONS, POLICY_LOSSES

        if self.hybrid_engine == "ours":
            self.hybrid_engine = "on"
        for name in ("actor_zero_stage", "critic_zero_stage"):
            value = getattr(self, name)
            if value is not None and value not in (2, 3):
                raise UserError(f"--{name} {value}: choose 2 or 3")
        if self.reward_zero_stage is not None and self.reward_zero_stage not in (0, 3):
            raise UserError(f"--reward_zero_stage {self.reward_zero_stage}: choose 0 (a full copy per rank) or 3 "
                            f"(partitioned)")
        check_choice("advantage_estimator", self.advantage_estimator, tuple(ADVANTAGE_ESTIMATORS))
        check_choice("policy_loss", self.policy_loss, tuple(POLICY_LOSSES))
        check_choice("loss_agg", self.loss_agg, tuple(LOSS_AGGREGATIONS))
        check_choice("kl_estimator", self.kl_estimator, tuple(KL_ESTIMATORS))
        check_choice("fuse_experience", self.fuse_experience, ("auto", "off"))
        check_choice("hybrid_engine", self.hybrid_engine, ("on", "deepspeed", "off"))
        check_choice("hybrid_merge_lora", self.hybrid_merge_lora, ("auto", "on", "off"))
        if self.hybrid_gather_layers < 0:
            raise UserError(f"--hybrid_gather_layers {self.hybrid_gather_layers} must be >= 0")
        for name in ("max_new_tokens", "max_prompt_length", "ppo_epochs", "n_samples_per_prompt"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)} must be >= 1")
        if ADVANTAGE_ESTIMATORS[self.advantage_estimator].grouped and self.n_samples_per_prompt < 2:
            raise UserError(f"--advantage_estimator {self.advantage_estimator} compares the answers to one prompt: "
                            f"give --n_samples_per_prompt 2 or more")
        if self.temperature <= 0:
            raise UserError(f"--temperature {self.temperature} must be > 0")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p {self.top_p} must be in (0, 1]")
        if self.target_kl is not None and self.target_kl <= 0:
            raise UserError(f"--target_kl {self.target_kl} must be > 0")
        if not 0 < self.ema_beta < 1:
            raise UserError(f"--ema_beta {self.ema_beta} must be in (0, 1)")
        if self.init_kl_coef < 0:
            raise UserError(f"--init_kl_coef {self.init_kl_coef} must be >= 0")
        if self.ptx_coef < 0:
            raise UserError(f"--ptx_coef {self.ptx_coef} must be >= 0")
        if self.overlong_buffer < 0 or self.overlong_buffer >= self.max_new_tokens and self.overlong_buffer:
            raise UserError(f"--overlong_buffer {self.overlong_buffer} must be in [0, --max_new_tokens "
                            f"{self.max_new_tokens})")
        self.cliprange_low = self.cliprange if self.cliprange_low is None else self.cliprange_low
        self.cliprange_high = self.cliprange if self.cliprange_high is None else self.cliprange_high
        for name in ("actor_learning_rate", "critic_learning_rate", "cliprange", "cliprange_high",
                     "cliprange_value"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), low=0, low_open=True)
        check_range("cliprange_low", self.cliprange_low, 0, 1, low_open=True, high_open=True)
        check_range("gamma", self.gamma, 0, 1, low_open=True)
        check_range("lam", self.lam, 0, 1)
        if self.max_length_growth is not None:
            check_range("max_length_growth", self.max_length_growth, low=0, low_open=True)
        for name in ("vf_coef", "reward_clip", "overlong_penalty", "top_k", "num_samples_to_log", "length_penalty"):
            check_range(name, getattr(self, name), low=0)
        check_range("kl_horizon", self.kl_horizon, low=1)
        if self.per_device_generation_batch_size is not None:
            check_range("per_device_generation_batch_size", self.per_device_generation_batch_size, low=1)

    @property
    def needs_critic(self) -> bool:
        from rlhf_ds.algo.advantages import ADVANTAGE_ESTIMATORS

        return ADVANTAGE_ESTIMATORS[self.advantage_estimator].needs_critic

    @property
    def needs_reference(self) -> bool:
        return self.init_kl_coef > 0

    def reward_fns(self) -> list[str]:
        return [f.strip() for f in (self.reward_fn or "").split(",") if f.strip()]

    def weights(self) -> list[float]:
        """One weight per reward source: the reward model (if any), then each reward function."""
        n = int(bool(self.reward_model)) + len(self.reward_fns())
        if not self.reward_weights:
            return [1.0] * n
        try:
            weights = [float(w) for w in self.reward_weights.split(",")]
        except ValueError:
            raise UserError(f"--reward_weights {self.reward_weights!r}: write comma-separated numbers") from None
        if len(weights) != n:
            raise UserError(f"--reward_weights has {len(weights)} weight(s) for {n} reward source(s) (the reward "
                            f"model first, then each --reward_fn)")
        return weights


@dataclass
class DPOArguments:
    """Offline preference optimisation (train_dpo.py): the loss, its coefficients and the reference."""

    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO), ipo, hinge, simpo or orpo (see "
                                                                "rlhf_ds/algo/preference.py)."})
    beta: float = field(default=0.1, metadata={"help": "The loss's beta (ORPO: the weight of the odds-ratio term)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "sigmoid: the share of labels taken as flipped "
                                                                  "(conservative DPO)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "simpo: the reward margin."})
    ref_model: str | None = field(default=None, metadata={"help": "The reference policy: a model folder or a LoRA "
                                                                  "adapter (default: the starting policy; with LoRA "
                                                                  "and no --sft_model adapter, the policy with its "
                                                                  "adapter switched off)."})
    precompute_ref_logps: bool = field(default=True, metadata={"help": "Compute the reference log-probabilities of "
                                                                       "every pair once, before training, and free "
                                                                       "the reference (--no_precompute_ref_logps: a "
                                                                       "reference forward every step)."})
    share_prompt: str = field(default="auto", metadata={"help": "Compute a pair's prompt once, its chosen and "
                                                            "rejected answers packed behind it in one row: auto (where "
                                                            "that saves a fifth of the tokens), on (wherever the model "
                                                            "takes a 4D mask) or off."})

    def __post_init__(self) -> None:
        from rlhf_ds.algo.preference import PREFERENCE_LOSSES

        check_choice("loss_type", self.loss_type, tuple(PREFERENCE_LOSSES))
        check_choice("share_prompt", self.share_prompt, ("auto", "on", "off"))
        check_range("beta", self.beta, low=0, low_open=True)
        check_range("label_smoothing", self.label_smoothing, 0, 0.5, high_open=True)
        check_range("simpo_gamma", self.simpo_gamma, low=0)


# The online trainers' defaults: train_ppo.py (GAE with a critic, KL in the reward) and train_grpo.py.
PPO_DEFAULTS: dict[str, Any] = {"eval_steps": 50, "eval_before_train": True}
GRPO_DEFAULTS: dict[str, Any] = {**PPO_DEFAULTS, "advantage_estimator": "grpo", "n_samples_per_prompt": 4,
                                 "kl_in_loss": True, "kl_estimator": "k3", "init_kl_coef": 0.0,
                                 "normalize_reward": False, "loss_agg": "seq_mean_token_mean",
                                 "drop_uniform_groups": True, "temperature": 1.0}


STAGE_GROUPS = (ModelArguments, DataArguments, FinetuningArguments, TrainingArguments, RuntimeArguments)
ONLINE_GROUPS = (*STAGE_GROUPS, PolicyArguments, OnlineArguments)
DPO_GROUPS = (*STAGE_GROUPS, PolicyArguments, DPOArguments)
RM_GROUPS = (*STAGE_GROUPS, RewardArguments)
