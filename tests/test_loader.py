"""Deterministic, resumable, rank-sharded training batches and exactly-once evaluation batches."""
import itertools
import re

import numpy as np
import pytest
import torch

from vlm_sft.data.loader import TrainLoader, epoch_order, eval_batches, eval_shard
from vlm_sft.data.robo2vlm import Example, Robo2VLMSource, RowError, find_parquet_files
from vlm_sft.demo import make_robo2vlm_dir

KEYS = dict(prompt_key="question", choice_key="choices", answer_key="correct_answer", image_keys=["image"])


class ListSource:
    """Rows 0..n-1 without parquet; rows in `bad` fail to decode like a corrupt image would."""

    def __init__(self, n, row_groups=None, bad=()):
        self.n, self.groups, self.bad = n, row_groups or [n], set(bad)
        self.decoded = []

    def __len__(self):
        return self.n

    def row_groups(self):
        return list(self.groups)

    def source_of(self, i):
        return f"fake.parquet:{i}"

    def __getitem__(self, i):
        self.decoded.append(i)
        if i in self.bad:
            raise RowError(f"fake.parquet:{i}: undecodable image in column 'image'")
        return Example(f"fake.parquet:{i}", str(i), "q", ["a", "b"], 0, [])


def encode_id(ex):
    return int(ex.id)


def encode_id_and_pixels(ex):
    return ex.id, ex.answer_index, float(np.asarray(ex.images[0], dtype=np.float64).mean())


def encode_reject_odd(ex):
    if int(ex.id) % 2:
        raise ValueError("prompt too long: 300 tokens > max_prompt_length=256")
    return int(ex.id)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def flat(batch):
    return [x for mb in batch.micro_batches if mb is not None for x in mb]


# ---- epoch_order ----

def test_epoch_order_is_a_deterministic_permutation_per_seed_and_epoch():
    a = epoch_order(100, seed=1, epoch=0, shuffle=True)
    assert sorted(a) == list(range(100))
    assert a == epoch_order(100, seed=1, epoch=0, shuffle=True)
    assert a != epoch_order(100, seed=1, epoch=1, shuffle=True)
    assert a != epoch_order(100, seed=2, epoch=0, shuffle=True)
    assert epoch_order(100, seed=1, epoch=3, shuffle=False) == list(range(100))


def test_block_shuffle_visits_each_row_group_contiguously():
    groups = [3, 5, 2, 4, 6, 1]
    starts = np.cumsum([0] + groups[:-1]).tolist()
    orders = [epoch_order(21, seed=0, epoch=e, shuffle=True, row_groups=groups) for e in range(4)]
    for order in orders:
        assert sorted(order) == list(range(21))
        pos, group_order = 0, []
        while pos < 21:
            g = next(g for g, s in enumerate(starts) if s <= order[pos] < s + groups[g])
            block = order[pos:pos + groups[g]]
            assert sorted(block) == list(range(starts[g], starts[g] + groups[g]))
            group_order.append(g)
            pos += groups[g]
        assert sorted(group_order) == list(range(6))
    assert len({tuple(o) for o in orders}) == 4  # groups and rows within them reshuffle each epoch
    assert orders[0] != list(range(21))
    with pytest.raises(ValueError, match="row_groups sum to 20 rows, expected 21"):
        epoch_order(21, seed=0, epoch=0, shuffle=True, row_groups=[10, 10])


# ---- TrainLoader ----

def test_any_world_size_sees_the_same_samples_per_step():
    source = ListSource(27)  # 3 full global batches of 8 per epoch; 3 rows dropped each epoch
    steps = 7  # crosses two epoch boundaries
    single = take(TrainLoader(source, encode_id, list, global_batch_size=8, micro_batch_size=2, seed=3), steps)
    assert all(len(b.micro_batches) == 4 for b in single)
    for world in (2, 4):
        ranks = [take(TrainLoader(source, encode_id, list, global_batch_size=8, micro_batch_size=2,
                                  world_size=world, rank=r, seed=3), steps) for r in range(world)]
        for step in range(steps):
            assert all(len(ranks[r][step].micro_batches) == 4 // world for r in range(world))
            assert [x for r in range(world) for x in flat(ranks[r][step])] == flat(single[step])
            assert all(ranks[r][step].position == single[step].position for r in range(world))


def test_epochs_drop_the_partial_batch_and_reshuffle():
    loader = TrainLoader(ListSource(27), encode_id, list, global_batch_size=8, micro_batch_size=4, seed=0)
    assert loader.steps_per_epoch == 3
    batches = take(loader, 6)
    epoch0 = [x for b in batches[:3] for x in flat(b)]
    epoch1 = [x for b in batches[3:] for x in flat(b)]
    assert len(set(epoch0)) == len(set(epoch1)) == 24
    assert epoch0 == epoch_order(27, seed=0, epoch=0, shuffle=True)[:24]
    assert epoch1 == epoch_order(27, seed=0, epoch=1, shuffle=True)[:24]
    assert [b.position for b in batches] == [
        {"epoch": 0, "offset": 8}, {"epoch": 0, "offset": 16}, {"epoch": 1, "offset": 0},
        {"epoch": 1, "offset": 8}, {"epoch": 1, "offset": 16}, {"epoch": 2, "offset": 0}]
    assert loader.position == {"epoch": 2, "offset": 0}


def test_unshuffled_order_is_row_order():
    batches = take(TrainLoader(ListSource(16), encode_id, list, global_batch_size=4, micro_batch_size=2,
                               shuffle=False), 5)
    assert [flat(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15],
                                          [0, 1, 2, 3]]


def test_resume_from_any_position_reproduces_the_rest_of_the_stream():
    source = ListSource(30, row_groups=[7, 8, 9, 6])
    kwargs = dict(global_batch_size=8, micro_batch_size=2, world_size=2, rank=1, seed=5, lazy=True)
    full = take(TrainLoader(source, encode_id, list, **kwargs), 9)
    for k in (0, 2, 3, 6):  # 2 -> next batch starts epoch 1 (30 // 8 = 3 steps per epoch)
        resumed = take(TrainLoader(source, encode_id, list, position=full[k].position, **kwargs), 9 - k - 1)
        assert [flat(b) for b in resumed] == [flat(b) for b in full[k + 1:]]
        assert [b.position for b in resumed] == [b.position for b in full[k + 1:]]


def test_resume_does_not_decode_the_rows_before_the_position():
    source = ListSource(40)
    loader = TrainLoader(source, encode_id, list, global_batch_size=8, micro_batch_size=4,
                         position={"epoch": 2, "offset": 24})
    [batch] = take(loader, 1)
    assert sorted(source.decoded) == sorted(flat(batch))
    assert flat(batch) == epoch_order(40, seed=0, epoch=2, shuffle=True)[24:32]


def test_reiterating_continues_from_the_current_position():
    loader = TrainLoader(ListSource(20), encode_id, list, global_batch_size=4, micro_batch_size=4)
    first = take(loader, 3)
    again = take(loader, 2)
    reference = take(TrainLoader(ListSource(20), encode_id, list, global_batch_size=4, micro_batch_size=4), 5)
    assert [flat(b) for b in first + again] == [flat(b) for b in reference]


def test_bad_positions_and_too_few_rows():
    with pytest.raises(ValueError, match="out of range for 20 rows"):
        TrainLoader(ListSource(20), encode_id, list, global_batch_size=4, micro_batch_size=4,
                    position={"epoch": 0, "offset": 21})
    with pytest.raises(ValueError, match="data position must be"):
        TrainLoader(ListSource(20), encode_id, list, global_batch_size=4, micro_batch_size=4, position={"step": 3})
    with pytest.raises(ValueError, match="3 training rows are fewer than global_batch_size=4"):
        TrainLoader(ListSource(3), encode_id, list, global_batch_size=4, micro_batch_size=4)
    with pytest.raises(ValueError, match="data.bad_rows must be 'error' or 'skip'"):
        TrainLoader(ListSource(8), encode_id, list, global_batch_size=4, micro_batch_size=4, bad_rows="drop")


def test_skip_mode_counts_and_names_skipped_rows():
    loader = TrainLoader(ListSource(12, bad={0, 1, 5}), encode_id, list, global_batch_size=4, micro_batch_size=2,
                         shuffle=False, bad_rows="skip")
    b0, b1, b2 = take(loader, 3)
    assert b0.micro_batches == [None, [2, 3]]  # both rows of the first micro-batch were bad: collate not called
    assert (b0.num_skipped, b0.skipped_sources) == (2, ["fake.parquet:0", "fake.parquet:1"])
    assert b1.micro_batches == [[4], [6, 7]] and b1.skipped_sources == ["fake.parquet:5"]
    assert (b2.num_skipped, b2.skipped_sources) == (0, [])


def test_error_mode_raises_the_row_error():
    loader = TrainLoader(ListSource(12, bad={6}), encode_id, list, global_batch_size=4, micro_batch_size=2,
                         shuffle=False)
    it = iter(loader)
    next(it)
    with pytest.raises(RowError, match=r"^fake\.parquet:6: undecodable image"):
        next(it)


def test_encode_errors_are_named_by_source_and_skippable():
    kwargs = dict(global_batch_size=4, micro_batch_size=4, shuffle=False)
    with pytest.raises(RowError, match=r"^fake\.parquet:1: prompt too long"):
        take(TrainLoader(ListSource(8), encode_reject_odd, list, **kwargs), 1)
    [batch] = take(TrainLoader(ListSource(8), encode_reject_odd, list, bad_rows="skip", **kwargs), 1)
    assert batch.micro_batches == [[0, 2]] and batch.skipped_sources == ["fake.parquet:1", "fake.parquet:3"]


@pytest.fixture(scope="module")
def parquet_train(tmp_path_factory):
    d = make_robo2vlm_dir(tmp_path_factory.mktemp("robo"), n_train=40, n_test=4, train_files=3, rows_per_group=5,
                          image_format="mixed", bad_rows={3: "image", 17: "answer", 30: "choices"})
    return find_parquet_files(str(d), "train")


@pytest.mark.parametrize("lazy", [False, True])
def test_workers_give_identical_batches(parquet_train, lazy):
    source = Robo2VLMSource(parquet_train, lazy=lazy, **KEYS)
    kwargs = dict(global_batch_size=8, micro_batch_size=2, world_size=2, rank=1, seed=7, bad_rows="skip",
                  lazy=lazy)
    rng_state = torch.get_rng_state()
    with_workers = take(TrainLoader(source, encode_id_and_pixels, list, num_workers=2, **kwargs), 7)
    assert torch.equal(torch.get_rng_state(), rng_state)  # worker seeding left the global RNG alone
    in_process = take(TrainLoader(source, encode_id_and_pixels, list, num_workers=0, **kwargs), 7)
    assert with_workers == in_process
    skipped = [s for b in in_process for s in b.skipped_sources]
    assert skipped and all(re.fullmatch(r".*/train-0000\d-of-00003\.parquet:\d+", s) for s in skipped)


def test_worker_errors_keep_the_original_message(parquet_train):
    source = Robo2VLMSource(parquet_train, lazy=True, **KEYS)
    loader = TrainLoader(source, encode_id_and_pixels, list, global_batch_size=40, micro_batch_size=4,
                         shuffle=False, num_workers=2)
    with pytest.raises(RowError) as e:
        take(loader, 1)
    assert str(e.value).startswith(f"{parquet_train[0]}:3: undecodable image in column 'image'")
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


# ---- eval_batches ----

@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_covers_every_row_once(world):
    source = ListSource(23)
    seen = []
    for rank in range(world):
        batches = list(eval_batches(source, encode_id, list, batch_size=4, world_size=world, rank=rank))
        assert all(b.batch == b.indices for b in batches)
        assert all(len(b.indices) == 4 for b in batches[:-1]) and 1 <= len(batches[-1].indices) <= 4
        seen += [i for b in batches for i in b.indices]
    assert seen == list(range(23))


def test_eval_max_rows_and_skips():
    source = ListSource(23, bad={2, 9})
    batches = list(eval_batches(source, encode_id, list, batch_size=4, world_size=2, rank=0, max_rows=10,
                                bad_rows="skip"))
    assert [b.indices for b in batches] == [[0, 1, 3], [4]]
    assert [b.skipped_sources for b in batches] == [["fake.parquet:2"], []]
    batches = list(eval_batches(source, encode_id, list, batch_size=4, world_size=2, rank=1, max_rows=10,
                                bad_rows="skip"))
    assert [b.indices for b in batches] == [[5, 6, 7, 8]] + [[]] and batches[1].batch is None
    assert batches[1].num_skipped == 1
    assert sum(len(eval_shard(10, world_size=3, rank=r)) for r in range(3)) == 10


def test_eval_with_workers_matches_in_process(parquet_train):
    source = Robo2VLMSource(parquet_train, lazy=True, **KEYS)
    runs = [list(eval_batches(source, encode_id_and_pixels, list, batch_size=6, world_size=2, rank=1,
                              bad_rows="skip", num_workers=w)) for w in (0, 2)]
    assert runs[0] == runs[1]
    assert sum(len(b.indices) + b.num_skipped for b in runs[0]) == 20
    with pytest.raises(RowError, match=r"train-00000-of-00003\.parquet:3: undecodable image"):
        list(eval_batches(source, encode_id_and_pixels, list, batch_size=6, num_workers=2))
