"""report.md for a whole recipe run (SFT -> RM -> PPO): headline figures with a plain verdict on each stage, plots
of every curve, and prompts with the SFT answer and the PPO answer side by side. Built only from what the stages
wrote (metrics.jsonl, eval_results.json(l), eval_samples.jsonl), so it can be rebuilt at any time:

    python -m rlhf_ds.report output/recipe
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rlhf_ds.tracking import read_metrics


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|")


def plot_grid(rows: list[dict[str, Any]], panels: list[tuple[str, str]], out_png: Path, title: str) -> Path | None:
    """One line plot per (key, label) over the steps of `rows`, side by side."""
    panels = [(k, label) for k, label in panels if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(panels), 2)
    n_rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(6 * cols, 3.4 * n_rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None,
                markersize=3)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def build_report(run_dir: str | Path, settings: dict[str, Any] | None = None) -> Path:
    run = Path(run_dir)
    sft, rm, ppo = run / "sft", run / "rm", run / "ppo"
    settings = settings or _json(run / "recipe.json")
    lines = [f"# RLHF recipe report: {run.name}", ""]
    if settings:
        lines += [f"Model `{settings.get('model')}`, launched with `{settings.get('launcher', 'python')}`. "
                  f"Total wall time {settings.get('wall_minutes', '—')} min "
                  f"(SFT {settings.get('minutes', {}).get('sft', '—')}, RM {settings.get('minutes', {}).get('rm', '—')}, "
                  f"PPO {settings.get('minutes', {}).get('ppo', '—')}); sized by the {settings.get('profile', '—')} "
                  f"profile; peak memory of one process {max(settings.get('peak_memory_gib', {}).values(), default='—')}"
                  f" GiB.", ""]

    precisions = {name: _json(run / name / "training_args.json") for name in ("sft", "rm", "ppo")}
    ran = [f"{name.upper()} {a['precision']}" for name, a in precisions.items() if a.get("precision")]
    if ran:
        reasons = sorted({a.get("precision_reason", "") for a in precisions.values() if a.get("precision")})
        lines += [f"Precision that ran: {', '.join(ran)} ({'; '.join(r for r in reasons if r)}).", ""]

    sft_eval, rm_eval = _json(sft / "eval_results.json"), _json(rm / "eval_results.json")
    ppo_evals = _jsonl(ppo / "eval_results.jsonl")
    ppo_first, ppo_last = (ppo_evals[0], ppo_evals[-1]) if ppo_evals else ({}, {})
    ppo_train = read_metrics(ppo, "train")

    rows = [
        ("SFT", "held-out perplexity (lower is better)", sft_eval.get("init_eval_perplexity"),
         sft_eval.get("eval_perplexity")),
        ("RM", "held-out accuracy", None, rm_eval.get("eval_accuracy")),
        ("RM", "length-only baseline on the same pairs", None, rm_eval.get("eval_length_baseline_accuracy")),
        ("PPO", "reward of greedy answers to held-out prompts", ppo_first.get("eval_reward"),
         ppo_last.get("eval_reward")),
        ("PPO", "win rate against the reference answers (judged by the RM)", ppo_first.get("eval_win_rate"),
         ppo_last.get("eval_win_rate")),
        ("PPO", "KL to the reference policy (nats per answer)", ppo_first.get("eval_kl"), ppo_last.get("eval_kl")),
        ("PPO", "answer length (tokens)", ppo_first.get("eval_response_length"),
         ppo_last.get("eval_response_length")),
        ("PPO", "answers that end with EOS", ppo_first.get("eval_eos_rate"), ppo_last.get("eval_eos_rate")),
    ]
    lines += ["## Headline figures", "", "| stage | figure | before | after |", "| --- | --- | --- | --- |"]
    lines += [f"| {s} | {f} | {_fmt(b)} | {_fmt(a)} |" for s, f, b, a in rows]
    lines += ["", "## Did it work?", ""] + [f"- {v}" for v in _verdicts(sft_eval, rm_eval, ppo_first, ppo_last,
                                                                        ppo_train)] + [""]

    plots = []
    sft_png = plot_grid(read_metrics(sft, "train"), [("loss", "SFT training loss (answer tokens)")],
                        run / "sft_loss.png", "SFT")
    rm_png = plot_grid(read_metrics(rm, "train"), [("loss", "RM training loss"), ("accuracy", "RM training accuracy")],
                       run / "rm_training.png", "Reward model")
    ppo_png = plot_grid(ppo_train, [("reward", "reward (raw RM score)"), ("kl", "KL to reference"),
                                    ("response_length", "response length"), ("eos_rate", "EOS rate")],
                        run / "ppo_training.png", "PPO, per step (sampled rollouts)")
    eval_png = plot_grid(ppo_evals, [("eval_reward", "eval reward (greedy)"),
                                     ("eval_win_rate", "eval win rate vs reference")], run / "ppo_eval.png",
                         "PPO, held-out prompts")
    for png, caption in ((sft_png, "SFT loss"), (rm_png, "Reward model training"), (ppo_png, "PPO training"),
                         (eval_png, "PPO evaluation")):
        if png:
            plots.append(f"![{caption}]({png.name})")
    if plots:
        lines += ["## Curves", ""] + [p + "\n" for p in plots]

    samples = _jsonl(ppo / "eval_samples.jsonl")
    if samples:
        first_step, last_step = samples[0]["step"], samples[-1]["step"]
        before = {s["index"]: s for s in samples if s["step"] == first_step}
        after = {s["index"]: s for s in samples if s["step"] == last_step}
        lines += ["## SFT answer and PPO answer to the same held-out prompts", "",
                  f"Greedy answers of the policy before PPO (the SFT model, step {first_step}) and after it "
                  f"(step {last_step}); rewards by the reward model.", "",
                  "| prompt | reference answer | SFT answer (reward) | PPO answer (reward) |",
                  "| --- | --- | --- | --- |"]
        for index in sorted(before):
            b, a = before[index], after.get(index, {})
            lines.append(f"| {_cell(b['prompt'], 120)} | {_cell(b['reference'])} | "
                         f"{_cell(b['response'])} ({_fmt(b['reward'], 2)}) | "
                         f"{_cell(a.get('response', ''))} ({_fmt(a.get('reward'), 2)}) |")
        lines.append("")
    out = run / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def _verdicts(sft_eval: dict, rm_eval: dict, first: dict, last: dict, ppo_train: list[dict]) -> list[str]:
    out = []
    if "eval_perplexity" in sft_eval and "init_eval_perplexity" in sft_eval:
        b, a = sft_eval["init_eval_perplexity"], sft_eval["eval_perplexity"]
        out.append(f"SFT {'lowered' if a < b else 'did not lower'} the held-out perplexity ({b:.2f} -> {a:.2f}).")
    if "eval_accuracy" in rm_eval:
        acc, base = rm_eval["eval_accuracy"], rm_eval["eval_length_baseline_accuracy"]
        verdict = "beats" if acc > base else "matches" if abs(acc - base) < 0.02 else "falls short of"
        out.append(f"The reward model ranks {acc:.1%} of held-out pairs correctly (chance: 50%) and {verdict} the "
                   f"length-only baseline ({base:.1%}); the shipped comparison data rewards length heavily.")
    if first and last and first is not last:
        rb, ra = first["eval_reward"], last["eval_reward"]
        out.append(f"PPO {'raised' if ra > rb else 'did not raise'} the reward of greedy held-out answers "
                   f"({rb:.3f} -> {ra:.3f}) at a KL of {last['eval_kl']:.2f} nats per answer; the win rate against "
                   f"the reference answers went {first['eval_win_rate']:.1%} -> {last['eval_win_rate']:.1%}.")
    if len(ppo_train) >= 4:
        k = max(1, len(ppo_train) // 4)
        early = sum(r["reward"] for r in ppo_train[:k]) / k
        late = sum(r["reward"] for r in ppo_train[-k:]) / k
        out.append(f"Sampled rollouts: mean reward {early:.3f} over the first {k} steps, {late:.3f} over the last {k}.")
    return out or ["No stage results found."]


if __name__ == "__main__":
    print(build_report(sys.argv[1]))
