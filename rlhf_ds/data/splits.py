"""The length-controlled held-out split of the shipped comparison data.

In the shipped pairs the better answer is the longer one in all but 224 (89 of 1,095 English, 135 of 2,403
Chinese), so a reward model can score 90% by counting characters. `comparison_gpt4_heldout` keeps every one of
those 224 chosen-shorter pairs out of training, with as many chosen-longer pairs drawn beside them (the same number
per language, seeded), so held-out accuracy can be read separately where length helps and where it misleads;
`comparison_gpt4_zh_train` and `comparison_gpt4_en_train` are the rest, and `comparison_gpt4_{zh,en}_heldout` the held-out
pairs of one language (the recipe trains on Chinese and evaluates on those). Rebuild the files with
`python -m rlhf_ds.data.splits` (byte for byte the shipped ones; their sha256 are in data/NOTICE.md).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from rlhf_ds.args import DEFAULT_DATASET_DIR

SOURCES = {"en": "comparison_gpt4_data_en.partial.json", "zh": "comparison_gpt4_data_zh.partial.json"}
HELDOUT = "comparison_gpt4_heldout.json"
TRAIN = "comparison_gpt4_{lang}_train.json"
HELDOUT_OF = "comparison_gpt4_{lang}_heldout.json"
SEED = 20


def chosen_shorter(record: dict) -> bool:
    best, worse = record["output"][0], record["output"][1]
    return len(best) < len(worse)


def build(data_dir: str | Path = DEFAULT_DATASET_DIR) -> dict[str, list[dict]]:
    """{file name: records} of the split (deterministic)."""
    data_dir = Path(data_dir)
    rng = random.Random(SEED)
    files: dict[str, list[dict]] = {HELDOUT: []}
    for lang, name in SOURCES.items():
        records = [r for r in json.loads((data_dir / name).read_text(encoding="utf-8"))
                   if r["output"][0] != r["output"][1]]  # ties carry no preference
        shorter = [i for i, r in enumerate(records) if chosen_shorter(r)]
        longer = [i for i, r in enumerate(records) if len(r["output"][0]) > len(r["output"][1])]
        held = set(shorter) | set(rng.sample(longer, len(shorter)))
        files[HELDOUT_OF.format(lang=lang)] = [{**records[i], "language": lang} for i in sorted(held)]
        files[HELDOUT] += files[HELDOUT_OF.format(lang=lang)]
        files[TRAIN.format(lang=lang)] = [r for i, r in enumerate(records) if i not in held]
    return files


def write(data_dir: str | Path = DEFAULT_DATASET_DIR) -> list[Path]:
    out = []
    for name, records in build(data_dir).items():
        path = Path(data_dir) / name
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        out.append(path)
    return out


if __name__ == "__main__":
    for written in write():
        print(written)
