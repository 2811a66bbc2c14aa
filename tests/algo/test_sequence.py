import torch

from rlhf_ds.algo.sequence import gather_last, last_token_index, pad_sequences, position_ids_from_mask


def test_padding_left_and_right_finds_the_same_last_token():
    seqs = [[5, 6, 7], [8], [9, 10]]
    right_ids, right_mask = pad_sequences(seqs, 0, "right")
    left_ids, left_mask = pad_sequences(seqs, 0, "left")
    assert right_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert left_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert last_token_index(right_mask).tolist() == [2, 0, 1]
    assert last_token_index(left_mask).tolist() == [2, 2, 2]
    assert gather_last(right_ids, right_mask).tolist() == gather_last(left_ids, left_mask).tolist() == [7, 8, 10]


def test_position_ids_start_at_the_first_real_token():
    _, mask = pad_sequences([[1, 2, 3], [4]], 0, "left")
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    _, mask = pad_sequences([[1, 2, 3], [4]], 0, "right")
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert position_ids_from_mask(torch.tensor([[0, 1, 1, 1]])).tolist() == [[0, 0, 1, 2]]


def test_shared_prompt_pairs_pack_each_prompt_once_and_hide_the_chosen_answer_from_the_rejected_one():
    from rlhf_ds.algo.sequence import SharedPromptPairs
    from rlhf_ds.data.collate import PreferenceCollator

    rows = [{"chosen_ids": [5, 6, 7, 8, 9], "rejected_ids": [5, 6, 7, 11], "chosen_prompt_len": 3,
             "rejected_prompt_len": 3},
            {"chosen_ids": [20, 21, 22], "rejected_ids": [20, 24, 25, 26], "chosen_prompt_len": 1,
             "rejected_prompt_len": 1}]
    for side in ("left", "right"):
        batch = PreferenceCollator(0, side)(rows)
        packed = SharedPromptPairs.from_batch(batch["input_ids"], batch["attention_mask"], batch["answer_mask"], 0)
        # P = 3 (the longer prompt), A = 3 (the longest answer): [prompt | chosen | rejected]
        assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 11, 0, 0], [0, 0, 20, 21, 22, 0, 24, 25, 26]]
        assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 3, 0, 0], [0, 0, 0, 1, 2, 0, 1, 2, 3]]
        assert packed.targets.tolist() == [[8, 9, 0], [21, 22, 0], [11, 0, 0], [24, 25, 26]]
        assert packed.target_mask.sum(-1).tolist() == [2, 2, 1, 3]
    m = packed.mask[1].long()  # the second pair: prompt at column 2, chosen at 3-4, rejected at 6-8
    assert m[8].tolist() == [0, 0, 1, 0, 0, 0, 1, 1, 1]  # the last rejected token: the prompt and its own answer
    assert m[4].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0]  # the last chosen token: the prompt and its own answer
    assert m[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0]  # padding sees itself only, so no softmax row is empty
    # logits of the last 2A + 1 = 7 positions (2..8): chosen read at 2, 3, 4 and rejected at 2, 6, 7
    logits = torch.arange(2, 9).float().view(1, 7, 1).expand(2, 7, 1)
    assert packed.answer_logits(logits)[:, :, 0].tolist() == [[2, 3, 4]] * 2 + [[2, 6, 7]] * 2
    bias = packed.additive_mask(torch.float32)
    assert bias.shape == (2, 1, 9, 9) and (bias[1, 0, 8] == 0).long().tolist() == m[8].tolist()


def test_pairs_whose_prompts_differ_are_not_packed():
    from rlhf_ds.algo.sequence import SharedPromptPairs
    from rlhf_ds.data.collate import PreferenceCollator

    rows = [{"chosen_ids": [5, 6, 7, 8], "rejected_ids": [5, 9, 7, 11], "chosen_prompt_len": 3,
             "rejected_prompt_len": 3}]
    batch = PreferenceCollator(0, "left")(rows)
    assert SharedPromptPairs.from_batch(batch["input_ids"], batch["attention_mask"], batch["answer_mask"], 0) is None
