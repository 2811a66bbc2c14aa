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
