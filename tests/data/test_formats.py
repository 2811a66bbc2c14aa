"""Every record layout, every kind of bad input, ties and truncation."""
import pytest

from conftest import write_json, write_jsonl
from rlhf_ds.args import DEFAULT_DATASET_DIR
from rlhf_ds.data.formats import split_dialogue
from rlhf_ds.data.loading import DataReport, fit_to_length, load_examples, split_eval
from rlhf_ds.errors import UserError

USER = [{"role": "user", "content": "What is 2+2?"}]


def load(path, kind="preference", **kw):
    return load_examples(str(path), kind, DEFAULT_DATASET_DIR, **kw)


def test_ranked_list_gives_every_ordered_pair(tmp_path):
    f = write_json(tmp_path / "r.json", [{"instruction": "What is 2+2?", "input": "", "output": ["4", "5", "22"]}])
    ds = load(f)
    assert [(r["chosen"], r["rejected"]) for r in ds] == [("4", "5"), ("4", "22"), ("5", "22")]
    assert ds[0]["prompt"] == USER


def test_input_is_joined_to_the_instruction(tmp_path):
    f = write_json(tmp_path / "r.json", [{"instruction": "Add", "input": "2 and 2", "output": ["4", "5"]}])
    assert load(f)[0]["prompt"] == [{"role": "user", "content": "Add\n2 and 2"}]


def test_pairwise_layout(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "What is 2+2?", "chosen": "4", "rejected": "5"}])
    ds = load(f)
    assert (ds[0]["prompt"], ds[0]["chosen"], ds[0]["rejected"]) == (USER, "4", "5")


def test_dialogue_splits_at_the_last_shared_assistant_turn(tmp_path):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 5."
    f = write_jsonl(tmp_path / "d.jsonl", [{"chosen": chosen, "rejected": rejected}])
    ex = load(f)[0]
    assert ex["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": "What is 2+2?"}]
    assert (ex["chosen"], ex["rejected"]) == ("It is 4.", "It is 5.")


def test_dialogue_that_differs_earlier_splits_at_the_common_prefix():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye!"
    rejected = "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Bye\n\nAssistant: Whatever."
    prompt, c, r = split_dialogue(chosen, rejected, "f", 0)
    assert prompt == [{"role": "user", "content": "Hi"}]
    assert c.startswith("Hello!") and "Human: Bye" in c and r.startswith("Go away.")


def test_alpaca_layout_for_sft_and_refused_for_preference(tmp_path):
    f = write_json(tmp_path / "a.json", [{"instruction": "Say hi", "input": "", "output": "hi"}])
    ds = load(f, kind="sft")
    assert (ds[0]["prompt"], ds[0]["response"]) == ([{"role": "user", "content": "Say hi"}], "hi")
    with pytest.raises(UserError, match="one answer per prompt"):
        load(f)


def test_ranked_file_for_sft_takes_the_best_answer(tmp_path):
    f = write_json(tmp_path / "r.json", [{"instruction": "What is 2+2?", "input": "", "output": ["4", "5"]}])
    assert load(f, kind="sft")[0]["response"] == "4"


def test_format_flag_overrides_detection(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match="missing key 'output'"):
        load(f, dataset_format="ranked")


def test_ties_are_counted_and_dropped_unless_kept(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": ["same", "same"] if i < 2 else ["a", "b"]}
            for i in range(5)]
    f = write_json(tmp_path / "t.json", rows)
    report = DataReport()
    assert len(load(f, report=report)) == 3
    assert "dropped 2 ties" in report.lines[0]
    assert len(load(f, keep_ties=True)) == 5


def test_shipped_chinese_comparison_has_its_twenty_ties():
    report = DataReport()
    ds = load_examples("comparison_gpt4_zh", "preference", DEFAULT_DATASET_DIR, report=report)
    assert len(ds) == 2403 - 20 and "dropped 20 ties" in report.lines[0]


def test_datasets_mix_with_commas(tmp_path):
    f = write_json(tmp_path / "r.json", [{"instruction": "q", "input": "", "output": ["a", "b"]}])
    ds = load_examples(f"comparison_gpt4_en,{f}", "preference", DEFAULT_DATASET_DIR)
    assert len(ds) == 1095 + 1


def test_max_samples_takes_the_first_records():
    ds = load_examples("comparison_gpt4_en", "preference", DEFAULT_DATASET_DIR, max_samples=7)
    assert len(ds) == 7 and ds[0]["prompt"][0]["content"] == "What are the three primary colors?"


@pytest.mark.parametrize("content, expected", [
    ('[{"instruction": "q", "output": ["a", "b"]},\n{"instruction": "q2" "output": ["a"]}]', r"line 2, column"),
    ('{"instruction": "q", "output": ["a", "b"]}', r"line 1"),  # a lone object read as JSON Lines still works
])
def test_invalid_json_names_the_line(tmp_path, content, expected):
    f = tmp_path / "bad.json"
    f.write_text(content)
    if expected == r"line 1":
        assert len(load(f)) == 1
        return
    with pytest.raises(UserError, match=expected) as err:
        load(f)
    assert str(f) in str(err.value)


def test_invalid_jsonl_line_is_named(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "q", "chosen": "a", "rejected": "b"}\n{"instruction": "q2", "chosen": \n')
    with pytest.raises(UserError, match=r"bad.jsonl: line 2: invalid JSON"):
        load(f)


@pytest.mark.parametrize("record, message", [
    ({"input": "", "output": ["a", "b"]}, r"record 2: missing key 'instruction'"),
    ({"instruction": 5, "input": "", "output": ["a", "b"]}, r"record 2: key 'instruction' must be a string"),
    ({"instruction": "q", "input": "", "output": ["a"]}, r"record 2: key 'output' has 1 answer\(s\)"),
    ({"instruction": "q", "input": "", "output": ["a", ""]}, r"record 2: output\[1\] is empty"),
    ({"instruction": "  ", "input": "", "output": ["a", "b"]}, r"record 2: key 'instruction' is empty"),
    ({"instruction": "q", "input": "", "output": "just one"}, r"record 2: key 'output' must be a list"),
    ({"instruction": "q", "input": "", "output": ["a", 3]}, r"record 2: output\[1\] must be a string"),
])
def test_bad_records_name_the_record_and_key(tmp_path, record, message):
    good = {"instruction": "q", "input": "", "output": ["a", "b"]}
    f = write_json(tmp_path / "r.json", [good, record, good])
    with pytest.raises(UserError, match=message) as err:
        load(f)
    assert str(f) in str(err.value) and " — " in str(err.value)  # a fix follows the problem


def test_not_a_list_and_empty_files(tmp_path):
    f = write_json(tmp_path / "obj.json", {"data": []})
    with pytest.raises(UserError):
        load(f)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(UserError, match="no records"):
        load(empty)


def test_unknown_layout_suggests_the_format_flag(tmp_path):
    f = write_json(tmp_path / "x.json", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(UserError, match="--dataset_format"):
        load(f)


def test_fit_to_length_cuts_prompt_from_the_left_first():
    prompt, response = list(range(10)), [100, 101, 102]
    assert fit_to_length(prompt, response, 20) == (prompt, response, False, False)
    p, r, p_cut, r_cut = fit_to_length(prompt, response, 8)
    assert p == [5, 6, 7, 8, 9] and r == response and p_cut and not r_cut
    p, r, p_cut, r_cut = fit_to_length(prompt, list(range(100, 120)), 8)
    assert p == [6, 7, 8, 9] and r == [100, 101, 102, 103] and p_cut and r_cut  # prompt keeps half the budget


def test_eval_split_is_deterministic_and_checked():
    ds = load_examples("comparison_gpt4_en", "preference", DEFAULT_DATASET_DIR, max_samples=100)
    a_train, a_eval = split_eval(ds, 0.2, seed=3)
    b_train, b_eval = split_eval(ds, 20, seed=3)
    assert len(a_eval) == 20 and a_eval["chosen"] == b_eval["chosen"]
    with pytest.raises(UserError, match="--val_size"):
        split_eval(ds, 100, seed=3)


def test_gsm8k_is_registered_in_the_question_answer_layout_and_every_answer_parses():
    from rlhf_ds.rewards import final_answer, math_answer

    ds = load_examples("gsm8k_test", "sft", DEFAULT_DATASET_DIR)
    assert len(ds) == 1319
    first = ds[0]
    assert [m["role"] for m in first["prompt"]] == ["user"] and "####" in first["response"]
    finals = [line.split("####")[-1] for line in ds["response"]]
    assert all(final_answer(f) is not None for f in finals)  # thousands separators and minus signs included
    assert all(math_answer("", r, r) == 1.0 for r in ds["response"][:200])
    with pytest.raises(UserError, match="one answer per prompt"):
        load_examples("gsm8k_test", "preference", DEFAULT_DATASET_DIR)
