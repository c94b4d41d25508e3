"""Shuffled batches: epoch order, ranks, resuming, chunk locality, pixels and PyTorch.

Orders are checked for their properties (a permutation, disjoint equal ranks, few chunks per
window), pixels against plain zarr reads of the store and a numpy float64 oracle from the
prepared pixels and stats, and a real DataLoader against the plain iterator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import CHUNK, Fitted, oracle_dataset_constants

from pipeline import open_normalized
from pipeline.normalize.stage import run_normalize
from pipeline.params import parse_params
from pipeline.reader.batches import BatchSampler, EpochPlan

# (samples, first row, chunk): aligned, unaligned start and short last chunk, one chunk, tiny
PLANS = {
    "aligned": (64, 0, 8),
    "unaligned": (101, 5, 16),
    "one chunk": (7, 2, 16),
    "tiny": (3, 0, 1),
}


def plan(name: str = "unaligned", **kw: Any) -> EpochPlan:
    n, first, chunk = PLANS[name]
    return EpochPlan(samples=n, first=first, chunk=chunk, **{"batch_size": 10, **kw})


@pytest.fixture(scope="module")
def folder(rgb8: Fitted) -> Path:
    """A per_channel float32 store of the rgb8 fixture (30 samples, chunks of 2)."""
    p = parse_params({"base": {"scheduler": "synchronous"}, "normalize": {"mode": "per_channel"}})
    out = rgb8.prepared.parent / "normalized"  # beside prepared/ and stats/, as lineage wants
    run_normalize(rgb8.prepared, rgb8.stats, out, p)
    return out


def stored(folder: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(folder / "images.zarr" / "images", mode="r")[...])


# --- the epoch order -----------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", ["chunks", "uniform", "none"])
@pytest.mark.parametrize("name", PLANS)
def test_every_sample_exactly_once_per_epoch(name: str, shuffle: str) -> None:
    p = plan(name, shuffle=shuffle, buffer=2)
    for epoch in range(3):
        batches = p.batches(epoch)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(p.samples))
        assert [len(b) for b in batches[:-1]] == [10] * (len(batches) - 1)
        assert len(batches) == len(p) == -(-p.samples // 10)
        assert all((np.diff(b) >= 0).all() for b in batches)  # sorted for a chunk-local read


def test_drop_last_drops_only_the_short_last_batch() -> None:
    p = plan("unaligned", drop_last=True)
    batches = p.batches(0)
    assert len(batches) == len(p) == 10
    assert {len(b) for b in batches} == {10}
    assert len(set(np.concatenate(batches).tolist())) == 100


@pytest.mark.parametrize("shuffle", ["chunks", "uniform"])
def test_order_depends_on_seed_and_epoch_only(shuffle: str) -> None:
    p = plan(shuffle=shuffle)
    orders = {(s, e): p.order(e) if s == 0 else plan(shuffle=shuffle, seed=s).order(e)
              for s in (0, 1) for e in (0, 1, 2)}  # fmt: skip
    keys = list(orders)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not np.array_equal(orders[a], orders[b]), (a, b)
    again = EpochPlan(samples=101, first=5, chunk=16, batch_size=10, shuffle=shuffle, seed=1)
    np.testing.assert_array_equal(again.order(2), orders[(1, 2)])
    assert plan(shuffle="none").order(3).tolist() == list(range(101))


def chunks_per_window(order: np.ndarray, first: int, chunk: int, window: int) -> list[int]:
    """Distinct store chunks in each slice of ``window`` consecutive samples of ``order``."""
    rows = first + order
    return [len(set((rows[a : a + window] // chunk).tolist())) for a in range(0, len(rows), window)]


def closed_runs(order: np.ndarray, first: int, chunk: int) -> list[int]:
    """Cut ``order`` into the shortest runs that each hold whole chunks of the view (every
    sample of each chunk they touch); the number of chunks of each run."""
    rows = (first + order) // chunk
    sizes = dict(zip(*np.unique(rows, return_counts=True), strict=True))
    runs, touched, seen = [], set(), 0
    for c in rows.tolist():
        touched.add(c)
        seen += 1
        if seen == sum(sizes[t] for t in touched):
            runs.append(len(touched))
            touched, seen = set(), 0
    return runs


@pytest.mark.parametrize("first", [0, 5])
def test_windows_touch_few_chunks_and_uniform_touches_many(first: int) -> None:
    n, chunk, buffer = 2048, 16, 4
    window = buffer * chunk
    local = EpochPlan(samples=n, first=first, chunk=chunk, batch_size=32, buffer=buffer)
    uniform = EpochPlan(samples=n, first=first, chunk=chunk, batch_size=32, shuffle="uniform")
    for epoch in (0, 1):
        order = local.order(epoch)
        counts = chunks_per_window(order, first, chunk, window)
        if first == 0:  # whole chunks: each window of the order is `buffer` chunks
            assert set(counts) == {buffer}
        else:  # the short first and last chunks shift the windows: a slice spans two at most
            assert max(counts) <= 2 * buffer
        # every chunk is read within a run of the order that touches at most `buffer` chunks
        assert max(closed_runs(order, first, chunk)) <= buffer
        spread = chunks_per_window(uniform.order(epoch), first, chunk, window)
        assert np.mean(spread) > 8 * buffer  # 64 draws from about 128 chunks: ~50 of them
        assert len(closed_runs(uniform.order(epoch), first, chunk)) <= 2  # the whole epoch
    # a batch of 32 from windows of 64 spans at most two windows
    for b in local.batches(0):
        assert len(set(((first + b) // chunk).tolist())) <= 2 * buffer
    # and the samples are still mixed: most batches hold several chunks
    assert np.median([len(set(((first + b) // chunk).tolist())) for b in local.batches(0)]) >= 3


def test_default_buffer_holds_several_batches() -> None:
    ds_like = type("D", (), {"start": 0, "chunk_samples": 16, "__len__": lambda self: 1000})()
    from pipeline.reader.batches import make_plan

    assert make_plan(ds_like, 64).buffer == 16  # 4 batches of 64 in chunks of 16
    assert make_plan(ds_like, 4).buffer == 8  # at least 8 chunks


# --- ranks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3, 4, 7])
@pytest.mark.parametrize("shuffle", ["chunks", "uniform"])
def test_ranks_are_disjoint_equal_parts_of_the_epoch(world_size: int, shuffle: str) -> None:
    n = 101
    for drop_last in (False, True):
        parts = [
            np.concatenate(plan(shuffle=shuffle, rank=r, world_size=world_size,
                                drop_last=drop_last, batch_size=4).batches(1))
            for r in range(world_size)
        ]  # fmt: skip
        sizes = {len(p) for p in parts}
        assert len(sizes) == 1
        lens = {len(plan(rank=r, world_size=world_size, drop_last=drop_last, batch_size=4))
                for r in range(world_size)}  # fmt: skip
        assert len(lens) == 1  # every rank runs the same number of steps
        joined = np.concatenate(parts)
        epoch = plan(shuffle=shuffle).order(1)
        if drop_last:
            m = n // world_size
            assert len(set(joined.tolist())) == len(joined)  # disjoint
            assert set(joined.tolist()) <= set(epoch.tolist())
            per_rank = m - m % 4  # drop_last also drops each rank's short last batch
            assert len(joined) == per_rank * world_size
            assert set(joined.tolist()) == {
                int(i) for r in range(world_size) for i in epoch[r * m : r * m + per_rank]
            }
        else:
            m = -(-n // world_size)
            assert sizes == {m}
            assert set(joined.tolist()) == set(range(n))  # the union is the epoch
            pad = m * world_size - n
            values, counts = np.unique(joined, return_counts=True)
            assert counts.max() <= 2
            # padding repeats the epoch's first samples, as DistributedSampler does
            assert sorted(values[counts == 2].tolist()) == sorted(epoch[:pad].tolist())


# --- resuming ----------------------------------------------------------------------------------


@pytest.mark.parametrize("after", [0, 1, 5, 10, 11])
def test_sampler_resumes_with_exactly_the_remaining_batches(after: int) -> None:
    p = plan(shuffle="chunks", seed=3, rank=1, world_size=2, batch_size=5)
    full = BatchSampler(p, epoch=4)
    expected = list(full)
    assert len(expected) == len(full) == 11
    first = BatchSampler(p, epoch=4)
    it = iter(first)
    seen = [next(it) for _ in range(after)]
    saved = json.loads(json.dumps(first.state_dict()))  # plain JSON
    resumed = BatchSampler(p, epoch=0)
    resumed.load_state_dict(saved)
    resumed.set_epoch(4)  # the usual loop calls set_epoch: the resume point stays
    rest = list(resumed)
    assert seen + rest == expected
    assert list(resumed) == expected  # the next pass is the whole epoch again
    resumed.set_epoch(5)
    assert list(resumed) != expected


def test_state_dict_takes_the_batches_a_loop_consumed() -> None:
    sampler = BatchSampler(plan(batch_size=10), epoch=2)
    expected = list(sampler)
    state = sampler.state_dict(batches=3)  # a DataLoader with workers fetched ahead
    fresh = BatchSampler(plan(batch_size=10))
    fresh.load_state_dict(state)
    assert list(fresh) == expected[3:]


def test_batches_iterator_resumes(folder: Path) -> None:
    ds = open_normalized(folder).split("train")
    whole = list(ds.batches(4, seed=5, epoch=1))
    it = ds.batches(4, seed=5, epoch=1)
    assert len(it) == len(whole) == 6
    head = [next(it) for _ in range(2)]
    state = it.state_dict()
    rest = ds.batches(4, seed=5, epoch=1)
    rest.load_state_dict(state)
    assert len(rest) == 4
    got = head + list(rest)
    assert len(got) == len(whole)
    for (x, y), (x1, y1) in zip(got, whole, strict=True):
        assert x.tobytes() == x1.tobytes()
        np.testing.assert_array_equal(y, y1)


# --- pixels from a real store ------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("channels_first", [False, True])
def test_batches_equal_the_store_and_a_float64_oracle(
    rgb8: Fitted, folder: Path, split: str, channels_first: bool
) -> None:
    ds = open_normalized(folder, channels_first=channels_first).split(split)
    start, stop = rgb8.splits[split]
    data = stored(folder)
    offset, scale = oracle_dataset_constants("per_channel", rgb8.train, 1.0)
    seen: list[int] = []
    order = ds.batch_sampler(3, seed=2, epoch=1, buffer=2)
    for (images, labels), idx in zip(ds.batches(3, seed=2, epoch=1, buffer=2), order,
                                     strict=True):  # fmt: skip
        rows = start + np.asarray(idx)
        expected = data[rows]
        oracle = (rgb8.images[rows].astype(np.float64) - offset) / scale
        if channels_first:
            expected, oracle = expected.transpose(0, 3, 1, 2), oracle.transpose(0, 3, 1, 2)
        assert images.dtype == np.float32
        assert images.tobytes() == np.ascontiguousarray(expected).tobytes()
        np.testing.assert_allclose(images, oracle, rtol=1e-6, atol=1e-6)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, rgb8.labels[rows])
        seen += list(idx)
    assert sorted(seen) == list(range(stop - start))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_batches_stay_chunk_local(folder: Path, split: str) -> None:
    ds = open_normalized(folder).split(split)  # val starts inside a chunk (rows 23..26)
    assert ds.chunk_samples == CHUNK
    sampler = ds.batch_sampler(2, buffer=2, seed=0, epoch=3)
    assert max(closed_runs(sampler.plan.order(3), ds.start, CHUNK)) <= 2
    assert sorted(i for b in sampler for i in b) == list(range(len(ds)))


# --- PyTorch -----------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("channels_first", [False, True])
def test_dataloader_yields_the_iterators_batches(
    folder: Path, workers: int, channels_first: bool
) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    ds = open_normalized(folder, channels_first=channels_first).split("train")
    args: dict[str, Any] = {"seed": 9, "epoch": 2, "rank": 1, "world_size": 2}
    sampler = ds.batch_sampler(4, **args)
    kwargs: dict[str, Any] = {"timeout": 120} if workers else {}
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, **kwargs)
    assert len(loader) == len(sampler) == 3
    got = [(x.numpy().copy(), y.numpy().copy()) for x, y in loader]
    expected = list(ds.batches(4, **args))
    assert len(got) == len(expected) == 3
    for (x, y), (x1, y1) in zip(got, expected, strict=True):
        assert x.dtype == x1.dtype == np.float32
        assert x.shape == x1.shape
        assert x.tobytes() == x1.tobytes()
        assert y.dtype == y1.dtype == np.int64
        np.testing.assert_array_equal(y, y1)
    assert torch is not None


# --- bad arguments -----------------------------------------------------------------------------

BAD_ARGS = {
    "batch_size 0": ({"batch_size": 0}, "positive integer for batch_size. Got 0"),
    "batch_size float": ({"batch_size": 2.5}, "for batch_size. Got 2.5"),
    "batch_size bool": ({"batch_size": True}, "for batch_size. Got True"),
    "rank >= world_size": ({"rank": 2, "world_size": 2}, "rank < world_size"),
    "negative rank": ({"rank": -1}, "for rank. Got -1"),
    "world_size 0": ({"world_size": 0}, "for world_size. Got 0"),
    "shuffle name": ({"shuffle": "random"}, "for shuffle. Got 'random'"),
    "negative seed": ({"seed": -3}, "for seed. Got -3"),
    "negative epoch": ({"epoch": -1}, "for epoch. Got -1"),
    "buffer 0": ({"buffer": 0}, "for buffer. Got 0"),
}


@pytest.mark.parametrize(("kw", "message"), BAD_ARGS.values(), ids=BAD_ARGS.keys())
def test_bad_arguments_are_one_clear_line(folder: Path, kw: dict[str, Any], message: str) -> None:
    ds = open_normalized(folder)
    args = {"batch_size": 4, **kw}
    batch_size = args.pop("batch_size")
    for make in (ds.batches, ds.batch_sampler):
        with pytest.raises(ValueError, match=message) as info:
            make(batch_size, **args)
        assert "\n" not in str(info.value)


def good_state() -> dict[str, Any]:
    sampler = BatchSampler(plan(), epoch=1)
    it = iter(sampler)
    next(it)
    return sampler.state_dict()


BAD_STATES = {
    "not a dict": (lambda s: [1, 2], "state dict from BatchSampler.state_dict"),
    "other schema": (lambda s: {**s, "schema": "x/1"}, "schema 'pipeline.batches/1'"),
    "no batch": (lambda s: {k: v for k, v in s.items() if k != "batch"}, "has no 'batch'"),
    "batch text": (lambda s: {**s, "batch": "3"}, "for batch. Got '3'"),
    "batch past end": (lambda s: {**s, "batch": 12}, "batch 12, past this epoch's 11"),
    "negative epoch": (lambda s: {**s, "epoch": -2}, "for epoch. Got -2"),
    "other batch_size": (lambda s: {**s, "batch_size": 5}, "batch_size=5, but this sampler"),
    "other samples": (lambda s: {**s, "samples": 100}, "samples=100, but this sampler has 101"),
    "bad rank": (lambda s: {**s, "rank": 3}, "corrupt: Expected rank < world_size"),
    "shuffle type": (lambda s: {**s, "shuffle": 1}, "corrupt: Expected True, False"),
}


@pytest.mark.parametrize(("edit", "message"), BAD_STATES.values(), ids=BAD_STATES.keys())
def test_a_corrupt_state_dict_is_one_clear_line(edit: Any, message: str) -> None:
    sampler = BatchSampler(plan(), epoch=0)
    with pytest.raises(ValueError, match=message) as info:
        sampler.load_state_dict(edit(good_state()))
    assert "\n" not in str(info.value)
    assert list(sampler) == [b.tolist() for b in plan().batches(0)]  # untouched
