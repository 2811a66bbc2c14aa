"""Registered names resolve to the full file (sha1-checked), the shipped subset, or a clear instruction."""
import hashlib
import json
from pathlib import Path

import pytest

from rlhf_ds.args import DEFAULT_DATASET_DIR
from rlhf_ds.data.registry import resolve
from rlhf_ds.errors import UserError


def test_registered_name_uses_shipped_subset():
    src = resolve("comparison_gpt4_zh", DEFAULT_DATASET_DIR)
    assert src.path.name == "comparison_gpt4_data_zh.partial.json"
    assert src.format == "ranked"
    assert "comparison_gpt4_data_zh.json" in src.note  # says where the full file would go


def test_registered_name_without_any_file_says_what_to_put_where():
    with pytest.raises(UserError) as err:
        resolve("alpaca_gpt4_en", DEFAULT_DATASET_DIR)
    msg = str(err.value)
    assert "alpaca_gpt4_data_en.json" in msg and DEFAULT_DATASET_DIR in msg
    assert "647f4ad447bd993e4b6b6223d1be15208bab694a" in msg


def test_unknown_name_lists_known_names():
    with pytest.raises(UserError) as err:
        resolve("comparison_gpt5", DEFAULT_DATASET_DIR)
    for name in ("comparison_gpt4_zh", "comparison_gpt4_en", "alpaca_gpt4_zh", "alpaca_gpt4_en"):
        assert name in str(err.value)


def test_missing_path_is_reported():
    with pytest.raises(UserError, match="file not found"):
        resolve("nowhere/x.json", DEFAULT_DATASET_DIR)


def _registry(tmp_path, full_bytes: bytes, sha1: str):
    (tmp_path / "subset.json").write_text('[{"instruction": "q", "input": "", "output": ["a", "b"]}]')
    (tmp_path / "full.json").write_bytes(full_bytes)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"demo": {
        "file_name": "full.json", "file_sha1": sha1, "format": "ranked", "shipped_subset": "subset.json"}}))


def test_full_file_with_matching_sha1_is_used(tmp_path):
    full = b'[{"instruction": "q", "input": "", "output": ["a", "b"]}, {"instruction": "r", "output": ["c", "d"]}]'
    _registry(tmp_path, full, hashlib.sha1(full).hexdigest())
    src = resolve("demo", tmp_path)
    assert src.path.name == "full.json" and src.note == "full file"


def test_full_file_with_wrong_sha1_is_refused(tmp_path):
    _registry(tmp_path, b"[]", "0" * 40)
    with pytest.raises(UserError) as err:
        resolve("demo", tmp_path)
    assert "sha1" in str(err.value) and "--dataset path/to/your_file.json" in str(err.value)


def test_shipped_files_match_their_notice():
    """The shipped subsets are byte-identical to what data/NOTICE.md records."""
    text = (Path(DEFAULT_DATASET_DIR) / "NOTICE.md").read_text(encoding="utf-8")
    for name in ("comparison_gpt4_data_en.partial.json", "comparison_gpt4_data_zh.partial.json",
                 "alpaca_gpt4_data_zh.subset.json"):
        digest = hashlib.sha256((Path(DEFAULT_DATASET_DIR) / name).read_bytes()).hexdigest()
        assert digest in text, name


def test_the_length_controlled_split_is_rebuilt_byte_for_byte_and_keeps_chosen_shorter_pairs_out_of_training():
    from rlhf_ds.data import splits

    notice = (Path(DEFAULT_DATASET_DIR) / "NOTICE.md").read_text(encoding="utf-8")
    built = splits.build(DEFAULT_DATASET_DIR)
    for name, records in built.items():
        shipped = (Path(DEFAULT_DATASET_DIR) / name).read_bytes()
        assert json.loads(shipped) == records, name
        assert hashlib.sha256(shipped).hexdigest() in notice, name
    held = built[splits.HELDOUT]
    assert len(held) == 448 and sum(splits.chosen_shorter(r) for r in held) == 224
    for lang in ("en", "zh"):
        train = built[splits.TRAIN.format(lang=lang)]
        assert not any(splits.chosen_shorter(r) for r in train)
        keys = {(r["instruction"], r["output"][0]) for r in train}
        assert not keys & {(r["instruction"], r["output"][0]) for r in held if r["language"] == lang}
        assert built[splits.HELDOUT_OF.format(lang=lang)] == [r for r in held if r["language"] == lang]


def test_the_arithmetic_problems_are_rebuilt_byte_for_byte_match_their_notice_and_keep_test_out_of_training(tmp_path):
    from rlhf_ds.data import arithmetic
    from rlhf_ds.rewards import final_answer

    text = (Path(DEFAULT_DATASET_DIR) / "NOTICE.md").read_text(encoding="utf-8")
    for built in arithmetic.write(tmp_path):
        shipped = Path(DEFAULT_DATASET_DIR) / built.name
        assert built.read_bytes() == shipped.read_bytes(), built.name
        assert hashlib.sha256(shipped.read_bytes()).hexdigest() in text, built.name
    train = [json.loads(x) for x in (tmp_path / "arithmetic_train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (tmp_path / "arithmetic_test.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (3000, 240)
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for record in test[:50]:  # the reference answer is what the math reward reads, and the worked steps agree
        steps, final = record["answer"].split("\n#### ")
        assert final_answer(record["answer"]) == float(final) and steps.rstrip(".").endswith(f"= {final}")
