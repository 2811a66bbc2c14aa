"""The promises the repository makes about itself: the README's commands, the pins, the shipped configs."""
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(.+?)\n```", text.split("## Two commands")[1].split("\n## ")[0], re.S)


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "launch/quickstart.sh" in commands[0] and "pytest" in commands[1]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci.splitlines()


def test_torch_is_pinned_exactly_and_everything_is_bounded():
    lines = [l.split("#")[0].strip() for l in (REPO / "requirements.txt").read_text().splitlines()]
    reqs = [l for l in lines if l]
    assert "torch==2.13.0" in reqs
    for req in reqs:
        assert "==" in req or "<" in req, f"{req} has no upper bound"
    for name in ("deepspeed", "transformers", "peft", "datasets", "ninja", "mpi4py", "sentencepiece"):
        assert any(r.startswith(name) for r in reqs), name


def test_shipped_ds_configs_are_valid_json_with_auto_batch_sizes():
    for path in (REPO / "ds_configs").glob("*.json"):
        cfg = json.loads(path.read_text())
        assert cfg["train_micro_batch_size_per_gpu"] == "auto", path.name
        assert cfg["zero_optimization"]["stage"] in (0, 2, 3)
