"""Every numeric flag is checked (finite, in range) with one line; a flags file with a syntax error names the file
and the line; preference data that would crash deep in a library, or silently lose pairs, is refused or reported."""
import pytest

from conftest import write_json
from rlhf_ds.args import (DEFAULT_DATASET_DIR, STAGE_GROUPS, DataArguments, FinetuningArguments, OnlineArguments,
                          RewardArguments, TrainingArguments)
from rlhf_ds.data.loading import DataReport, load_examples, tokenize_preference
from rlhf_ds.errors import UserError
from rlhf_ds.flag_parsing import parse_args


@pytest.mark.parametrize("group, flag, value, message", [
    (TrainingArguments, "learning_rate", "-1", "--learning_rate -1.0: must be in (0, inf)"),
    (TrainingArguments, "learning_rate", "nan", "--learning_rate nan: must be a finite number"),
    (TrainingArguments, "num_train_epochs", "inf", "--num_train_epochs inf: must be a finite number"),
    (TrainingArguments, "max_grad_norm", "-0.5", "--max_grad_norm -0.5: must be in [0, inf)"),
    (TrainingArguments, "adam_beta2", "1", "--adam_beta2 1.0: must be in [0, 1)"),
    (DataArguments, "val_size", "nan", "--val_size nan: must be a finite number"),
    (FinetuningArguments, "lora_alpha", "0", "--lora_alpha 0.0: must be in (0, inf)"),
    (OnlineArguments, "temperature", "nan", "--temperature nan: must be a finite number"),
    (OnlineArguments, "kl_horizon", "0", "--kl_horizon 0: must be in [1, inf)"),
    (OnlineArguments, "init_kl_coef", "-0.1", "--init_kl_coef -0.1 must be >= 0"),
    (OnlineArguments, "gamma", "1.5", "--gamma 1.5: must be in (0, 1]"),
    (OnlineArguments, "lam", "-1", "--lam -1.0: must be in [0, 1]"),
    (OnlineArguments, "cliprange", "0", "--cliprange 0.0: must be in (0, inf)"),
    (OnlineArguments, "cliprange_low", "1.2", "--cliprange_low 1.2: must be in (0, 1)"),
    (OnlineArguments, "top_k", "-3", "--top_k -3: must be in [0, inf)"),
])
def test_numeric_flags_out_of_range_are_one_line(group, flag, value, message):
    with pytest.raises(UserError) as err:
        parse_args(group, argv=[f"--{flag}", value])
    assert message in str(err.value)


def test_old_spellings_still_work_and_length_debias_composes_only_with_regress():
    (online,) = parse_args(OnlineArguments, argv=["--hybrid_engine", "ours"])
    assert online.hybrid_engine == "on"
    (reward,) = parse_args(RewardArguments, argv=["--length_debias", "length_negatives+regress"])
    assert reward.length_debias == "length_negatives+regress"
    for bad in ("regress+length_negatives", "odin+balanced", "none+regress", "length_negatives+bogus"):
        with pytest.raises(UserError, match="--length_debias"):
            parse_args(RewardArguments, argv=["--length_debias", bad])


def test_a_flags_file_with_a_syntax_error_names_the_file_and_the_line(tmp_path):
    bad = tmp_path / "ppo.yaml"
    bad.write_text("learning_rate: 1e-5\nper_device_train_batch_size: [4\nseed: 1\n")
    with pytest.raises(UserError, match=r"ppo.yaml: invalid YAML at line 3, column 5: expected .,. or .\]."):
        parse_args(*STAGE_GROUPS, argv=[str(bad)])
    bad = tmp_path / "ppo.json"
    bad.write_text('{"learning_rate": 1e-5,\n "seed": }')
    with pytest.raises(UserError, match=r"ppo.json: invalid JSON at line 2, column 10"):
        parse_args(*STAGE_GROUPS, argv=[str(bad)])


def test_a_file_of_ties_only_is_one_line_not_a_column_error(tmp_path):
    ties = write_json(tmp_path / "ties.json", [{"instruction": f"q{i}", "input": "", "output": ["same", "same"]}
                                               for i in range(5)])
    with pytest.raises(UserError, match="every one of its 5 pairs is a tie"):
        load_examples(str(ties), "preference", DEFAULT_DATASET_DIR)


def test_records_ranking_many_answers_are_capped_and_reported(tmp_path):
    many = write_json(tmp_path / "many.json", [{"instruction": "q", "input": "", "output": [f"a{i}" for i in
                                                                                             range(300)]}])
    report = DataReport()
    pairs = load_examples(str(many), "preference", DEFAULT_DATASET_DIR, report=report, max_answers_per_record=10)
    assert len(pairs) == 45 and set(pairs["chosen"]) <= {f"a{i}" for i in range(10)}
    assert "1 record(s) rank more than 10 answers" in report.lines[0]


def test_pairs_that_become_identical_when_cut_are_dropped_and_counted(tmp_path, tiny_llama):
    from rlhf_ds.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_llama, padding_side="right")
    long = "word " * 200
    data = write_json(tmp_path / "p.json", [{"instruction": "q", "input": "", "output": [long + "good", long + "bad"]},
                                            {"instruction": "q", "input": "", "output": ["short good", "bad"]}])
    report = DataReport()
    examples = load_examples(str(data), "preference", DEFAULT_DATASET_DIR, report=report)
    tokenized = tokenize_preference(examples, tok, "chat", 64, report)
    assert len(tokenized) == 1
    assert any("1 pair(s) became identical once cut to --max_length 64" in line for line in report.lines)
