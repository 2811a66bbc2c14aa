"""report.md for a whole recipe run: headline figures with a plain verdict on each stage, plots of every curve, and
held-out prompts with the answers before and after side by side. One section per stage the path ran (PPO: SFT ->
RM -> PPO; DPO: SFT -> RM -> DPO -> judge; GRPO). Built only from what the stages wrote (metrics.jsonl,
eval_results.json(l), eval_samples.jsonl, judge.json), so it can be rebuilt at any time:

    python -m rlhf_ds.report output/recipe
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_ds.tracking import read_metrics

# Answers this much longer than before count as a length blow-up in the verdicts (issue 20's bar for PPO and DPO).
LENGTH_GROWTH_FLAG = 0.20


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


def _growth(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else (after - before) / max(before, 1e-9)


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


@dataclass
class Section:
    """What one stage adds to the report: headline rows (figure, before, after), verdicts, plots and free text."""
    rows: list[tuple[str, Any, Any]] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    plots: list[tuple[Path | None, str]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------- stages
def sft_section(run: Path) -> Section:
    ev = _json(run / "sft" / "eval_results.json")
    s = Section(rows=[("held-out perplexity (lower is better)", ev.get("init_eval_perplexity"),
                       ev.get("eval_perplexity"))])
    if "eval_perplexity" in ev and "init_eval_perplexity" in ev:
        b, a = ev["init_eval_perplexity"], ev["eval_perplexity"]
        verb = "lowered" if a < b else "did not lower"
        s.verdicts.append(f"SFT {verb} the held-out perplexity ({b:.2f} -> {a:.2f}).")
    s.plots.append((plot_grid(read_metrics(run / "sft", "train"), [("loss", "SFT training loss (answer tokens)")],
                              run / "sft_loss.png", "SFT"), "SFT loss"))
    return s


def pair_rows(ev: dict, what: str) -> list[tuple[str, Any, Any]]:
    """The length-controlled figures of a pair scorer (reward model or DPO's implicit reward), from pair_metrics."""
    return [(f"{what}: held-out accuracy", None, ev.get("eval_accuracy")),
            ("length-only baseline on the same pairs (the longer answer wins)", None,
             ev.get("eval_length_baseline_accuracy")),
            (f"{what}: accuracy where the better answer is the shorter one "
             f"({ev.get('eval_chosen_shorter_pairs', '—')} pairs)", None, ev.get("eval_accuracy_chosen_shorter")),
            (f"{what}: length-balanced accuracy (mean of shorter-wins and longer-wins pairs)", None,
             ev.get("eval_length_balanced_accuracy")),
            (f"{what}: Spearman correlation of score and answer length", None,
             ev.get("eval_score_length_correlation"))]


def pair_verdict(ev: dict, what: str) -> str:
    acc, base = ev["eval_accuracy"], ev["eval_length_baseline_accuracy"]
    verdict = "beats" if acc > base + 0.02 else "matches" if abs(acc - base) <= 0.02 else "falls short of"
    line = (f"The {what} ranks {acc:.1%} of held-out pairs correctly (chance: 50%) and {verdict} the length-only "
            f"baseline ({base:.1%}).")
    shorter = ev.get("eval_accuracy_chosen_shorter")
    if shorter is not None:
        reading = "it judges more than length" if shorter >= 0.5 else "it mostly rewards length"
        if ev.get("eval_chosen_shorter_pairs", 0) < 20:  # a handful of pairs says nothing either way
            reading = "too few such pairs to tell (comparison_gpt4_heldout has 224)"
        line += (f" Where the better answer is the shorter one ({ev['eval_chosen_shorter_pairs']} pairs) it is right "
                 f"{shorter:.1%} of the time: {reading}.")
    return line


def rm_section(run: Path) -> Section:
    ev = _json(run / "rm" / "eval_results.json")
    args = _json(run / "rm" / "training_args.json")
    s = Section(rows=pair_rows(ev, "RM"))
    if "eval_accuracy" in ev:
        s.verdicts.append(pair_verdict(ev, "reward model") + f" (trained with --length_debias "
                                                            f"{args.get('length_debias', 'none')})")
    s.plots.append((plot_grid(read_metrics(run / "rm", "train"), [("loss", "RM training loss"),
                                                                   ("accuracy", "RM training accuracy")],
                              run / "rm_training.png", "Reward model"), "Reward model training"))
    return s


def online_section(run: Path, stage: str) -> Section:
    """PPO or GRPO: held-out figures at the first and the last evaluation, training curves, answers side by side."""
    evals = _jsonl(run / stage / "eval_results.jsonl")
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    train = read_metrics(run / stage, "train")
    name = stage.upper()
    s = Section()
    if any("eval_accuracy" in e for e in evals):
        s.rows.append(("held-out accuracy (greedy answers, math reward)", first.get("eval_accuracy"),
                       last.get("eval_accuracy")))
    s.rows += [("reward of greedy answers to held-out prompts", first.get("eval_reward"), last.get("eval_reward")),
               ("KL to the reference policy (nats per answer)", first.get("eval_kl"), last.get("eval_kl")),
               ("answer length (tokens)", first.get("eval_response_length"), last.get("eval_response_length")),
               ("answers that end with EOS", first.get("eval_eos_rate"), last.get("eval_eos_rate"))]
    if stage == "ppo":
        s.rows.insert(1, ("win rate against the reference answers (judged by the RM)", first.get("eval_win_rate"),
                          last.get("eval_win_rate")))
    if first and last and first is not last:
        if "eval_accuracy" in first:
            b, a = first["eval_accuracy"], last["eval_accuracy"]
            s.verdicts.append(f"{name} {'raised' if a > b else 'did not raise'} the share of held-out problems solved "
                              f"({b:.1%} -> {a:.1%}, {last.get('eval_samples', '—')} problems).")
        rb, ra = first["eval_reward"], last["eval_reward"]
        line = (f"{name} {'raised' if ra > rb else 'did not raise'} the reward of greedy held-out answers "
                f"({rb:.3f} -> {ra:.3f}) at a KL of {_fmt(last.get('eval_kl'), 2)} nats per answer")
        if stage == "ppo":
            line += (f"; the win rate against the reference answers went {first['eval_win_rate']:.1%} -> "
                     f"{last['eval_win_rate']:.1%}")
        s.verdicts.append(line + ".")
        rule = not _json(run / stage / "training_args.json").get("reward_model")
        s.verdicts.append(length_verdict(name, first.get("eval_response_length"), last.get("eval_response_length"),
                                         reward_rose=ra > rb, rule_reward=rule))
    if len(train) >= 4:
        k = max(1, len(train) // 4)
        early = sum(r["reward"] for r in train[:k]) / k
        late = sum(r["reward"] for r in train[-k:]) / k
        s.verdicts.append(f"{name} sampled rollouts: mean reward {early:.3f} over the first {k} steps, {late:.3f} over "
                          f"the last {k}.")
    panels = [("reward", "reward"), ("reward_math", "math reward (share correct)"), ("kl", "KL to reference"),
              ("response_length", "response length (tokens)"), ("eos_rate", "EOS rate")]
    s.plots.append((plot_grid(train, panels, run / f"{stage}_training.png", f"{name}, per step (sampled rollouts)"),
                    f"{name} training"))
    s.plots.append((plot_grid(evals, [("eval_reward", "eval reward (greedy)"), ("eval_accuracy", "eval accuracy"),
                                      ("eval_win_rate", "eval win rate vs reference"),
                                      ("eval_response_length", "eval answer length (tokens)")],
                              run / f"{stage}_eval.png", f"{name}, held-out prompts"), f"{name} evaluation"))
    s.text += side_by_side_from_samples(_jsonl(run / stage / "eval_samples.jsonl"), stage)
    return s


def length_verdict(name: str, before: float | None, after: float | None, reward_rose: bool | None = None,
                   rule_reward: bool = False) -> str:
    """The answer lengths before and after, and whether the reward rose without them rising past
    LENGTH_GROWTH_FLAG. A learnt judge can be paid in length (docs/length-bias.md); a rule reward (math, format)
    pays nothing for it, so there growth is the way the policy found to earn the rule's reward."""
    growth = _growth(before, after)
    if growth is None:
        return f"{name}: no answer lengths recorded."
    line = f"{name} answers went from {before:.1f} to {after:.1f} tokens ({growth:+.0%})"
    grew = growth > LENGTH_GROWTH_FLAG
    if reward_rose is not None:
        line += (f": the reward rose without the answers growing (by more than {LENGTH_GROWTH_FLAG:.0%})"
                 if reward_rose and not grew else
                 ": the reward rose with the answers growing" if reward_rose else ": the reward did not rise")
    if grew:
        line += (" — the rule reward does not pay for length, so this is how the policy earned it; "
                 "--length_penalty or --overlong_buffer bound it" if rule_reward else
                 " — longer answers buy reward from a judge that likes length; see docs/length-bias.md")
    return line + "."


def side_by_side_from_samples(samples: list[dict], stage: str) -> list[str]:
    if not samples:
        return []
    first_step, last_step = samples[0]["step"], samples[-1]["step"]
    before = {s["index"]: s for s in samples if s["step"] == first_step}
    after = {s["index"]: s for s in samples if s["step"] == last_step}
    name = stage.upper()
    out = [f"## Answers to the same held-out prompts before and after {name}", "",
           f"Greedy answers of the policy at step {first_step} (before {name}) and at step {last_step}; rewards in "
           f"brackets.", "", f"| prompt | reference answer | before (reward) | after {name} (reward) |",
           "| --- | --- | --- | --- |"]
    for index in sorted(before):
        b, a = before[index], after.get(index, {})
        out.append(f"| {_cell(b['prompt'], 120)} | {_cell(b['reference'])} | {_cell(b['response'])} "
                   f"({_fmt(b['reward'], 2)}) | {_cell(a.get('response', ''))} ({_fmt(a.get('reward'), 2)}) |")
    return out + [""]


def dpo_section(run: Path) -> Section:
    ev = _json(run / "dpo" / "eval_results.json")
    s = Section(rows=pair_rows(ev, "DPO implicit reward"))
    if "eval_accuracy" in ev:
        s.verdicts.append(pair_verdict(ev, "DPO policy's implicit reward"))
    s.plots.append((plot_grid(read_metrics(run / "dpo", "train"),
                              [("loss", "DPO loss"), ("reward_accuracy", "implicit reward accuracy (batch)"),
                               ("reward_margin", "implicit reward margin"), ("chosen_logps", "log p(chosen)")],
                              run / "dpo_training.png", "DPO"), "DPO training"))
    return s


def judge_section(run: Path) -> Section:
    result = _json(run / "judge" / "judge.json")
    s = Section()
    policies = result.get("policies", {})
    if len(policies) < 2:
        return s
    (base, b), *others = policies.items()
    for name, p in others:
        s.rows += [(f"{name} vs {base}: mean reward of greedy answers (judged by the RM)", b["mean_reward"],
                    p["mean_reward"]),
                   (f"{name} vs {base}: win rate", None, p["win_rate_vs_first"]),
                   (f"{name} vs {base}: answer length (tokens)", b["mean_length"], p["mean_length"])]
        s.verdicts.append(f"Judged by the reward model on {result['prompts']} held-out prompts, {name} beats {base} "
                          f"{p['win_rate_vs_first']:.1%} of the time (ties count half).")
        s.verdicts.append(length_verdict(name.upper(), b["mean_length"], p["mean_length"],
                                         reward_rose=p["mean_reward"] > b["mean_reward"]))
    names = list(policies)
    s.text += [f"## {' and '.join(names)} answers to the same held-out prompts", "",
               "Greedy answers; rewards by the reward model in brackets.", "",
               "| prompt | " + " | ".join(f"{n} (reward)" for n in names) + " |",
               "| --- |" + " --- |" * len(names)]
    for k, sample in enumerate(result.get("samples", [])[:8]):
        cells = [f"{_cell(sample[n])} ({_fmt(policies[n]['rewards'][k], 2)})" for n in names]
        s.text.append(f"| {_cell(sample['prompt'], 120)} | " + " | ".join(cells) + " |")
    s.text.append("")
    return s


SECTIONS = {"sft": sft_section, "rm": rm_section, "ppo": lambda run: online_section(run, "ppo"),
            "grpo": lambda run: online_section(run, "grpo"), "dpo": dpo_section, "judge": judge_section}
TITLES = {"sft": "SFT", "rm": "RM", "ppo": "PPO", "grpo": "GRPO", "dpo": "DPO", "judge": "judge"}


def build_report(run_dir: str | Path, settings: dict[str, Any] | None = None) -> Path:
    from rlhf_ds.recipe import PATHS

    run = Path(run_dir)
    settings = settings or _json(run / "recipe.json")
    algo = settings.get("algo", "ppo")
    stages = [name for name in PATHS.get(algo, PATHS["ppo"]) if (run / name).is_dir()]
    lines = [f"# {algo.upper()} recipe report: {run.name}", ""]
    if settings:
        minutes = settings.get("minutes", {})
        per_stage = ", ".join(f"{TITLES[n]} {minutes.get(n, '—')}" for n in stages)
        lines += [f"Model `{settings.get('model')}`, launched with `{settings.get('launcher', 'python')}`. "
                  f"Total wall time {settings.get('wall_minutes', '—')} min ({per_stage}); sized by the "
                  f"{settings.get('profile', '—')} profile; peak memory of one process "
                  f"{max(settings.get('peak_memory_gib', {}).values(), default='—')} GiB.", ""]
    precisions = {name: _json(run / name / "training_args.json") for name in stages}
    ran = [f"{TITLES[name]} {a['precision']}" for name, a in precisions.items() if a.get("precision")]
    if ran:
        reasons = sorted({a.get("precision_reason", "") for a in precisions.values() if a.get("precision")})
        lines += [f"Precision that ran: {', '.join(ran)} ({'; '.join(r for r in reasons if r)}).", ""]

    sections = {name: SECTIONS[name](run) for name in stages}
    lines += ["## Headline figures", "", "| stage | figure | before | after |", "| --- | --- | --- | --- |"]
    lines += [f"| {TITLES[name]} | {f} | {_fmt(b)} | {_fmt(a)} |" for name, s in sections.items()
              for f, b, a in s.rows]
    verdicts = [v for s in sections.values() for v in s.verdicts]
    lines += ["", "## Did it work?", ""] + [f"- {v}" for v in verdicts or ["No stage results found."]] + [""]
    plots = [f"![{caption}]({png.name})\n" for s in sections.values() for png, caption in s.plots if png]
    if plots:
        lines += ["## Curves", ""] + plots
    for s in sections.values():
        lines += s.text
    out = run / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


if __name__ == "__main__":
    print(build_report(sys.argv[1]))
