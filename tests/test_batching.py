"""Step plans do not depend on the split into ranks, micro-batches and accumulation."""

import pytest

from dialogtrain.data.collate import collate_sft, target_tokens
from dialogtrain.data.sampling import eval_micro_batches_of_rank, micro_batches_of_rank, step_batches


def test_step_batches_are_a_seeded_permutation_without_the_tail():
    steps = step_batches(10, 4, seed=1, epoch=0)
    assert [len(s) for s in steps] == [4, 4]
    assert len(set(sum(steps, []))) == 8
    assert steps == step_batches(10, 4, seed=1, epoch=0)
    assert steps != step_batches(10, 4, seed=1, epoch=1)


@pytest.mark.parametrize("world,micro,accum", [(1, 4, 1), (1, 2, 2), (1, 1, 4), (2, 2, 1), (2, 1, 2), (4, 1, 1)])
def test_every_split_covers_the_step_once(world, micro, accum):
    lengths = [7, 3, 9, 1, 5, 2, 8, 4]
    step = [6, 1, 3, 0]
    seen = []
    for rank in range(world):
        batches = micro_batches_of_rank(step, lengths, rank, world, micro)
        assert len(batches) == accum and all(len(b) == micro for b in batches)
        seen += sum(batches, [])
    assert sorted(seen) == sorted(step)


def test_micro_batches_group_by_length():
    # sorted by length: 3 (1), 1 (3), 0 (7), 6 (8); dealt in turn to 2 ranks
    assert micro_batches_of_rank([6, 1, 3, 0], [7, 3, 9, 1, 5, 2, 8, 4], 0, 2, 1) == [[3], [0]]
    assert micro_batches_of_rank([6, 1, 3, 0], [7, 3, 9, 1, 5, 2, 8, 4], 1, 2, 1) == [[1], [6]]


def test_eval_batches_cover_everything_with_equal_counts():
    per_rank = [eval_micro_batches_of_rank(5, r, 2, 2) for r in range(2)]
    assert per_rank == [[[0, 2], [4]], [[1, 3], []]]


def test_collate_pads_right_and_masks():
    batch = collate_sft([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_target_tokens_skip_the_first_position():
    assert target_tokens({"labels": [4, -100, 6, 7]}) == 2
