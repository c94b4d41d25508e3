"""The training side: open_normalized on real stores made by the real stages.

Expected values come from the stores read with plain zarr and from the prepared pixels, never
from the reader itself; refusal is checked by tampering with the files on disk.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import MODES, PER_IMAGE, Fitted, H, W

from pipeline import open_normalized
from pipeline.core.errors import StoreError
from pipeline.normalize.stage import run_normalize
from pipeline.params import parse_params

DATASET_MODES = ("per_channel", "per_pixel", "global", "mean_only", "min_max")

# rgb8 / gray16 (real prepared + stats folders, built once per module): see conftest.py


def normalize(
    fx: Fitted, out: Path, mode: str, dtype: str = "float32", scale: str = "pixel", **kw: Any
) -> Path:
    stats = kw.pop("stats", fx.stats)
    p = parse_params(
        {
            "base": {"scheduler": "synchronous"},
            "normalize": {"mode": mode, "dtype": dtype, "input_scale": scale, **kw},
        }
    )
    run_normalize(fx.prepared, stats, out, p)
    return out


Make = Callable[..., Path]


@pytest.fixture(scope="module")
def make(rgb8: Fitted, gray16: Fitted, tmp_path_factory: pytest.TempPathFactory) -> Make:
    """Normalized folders, made once per (data, mode, dtype, input_scale) and never modified."""
    made: dict[tuple[str, str, str, str], Path] = {}

    def get(data: str, mode: str, dtype: str = "float32", scale: str = "pixel") -> Path:
        key = (data, mode, dtype, scale)
        if key not in made:
            fx = rgb8 if data == "rgb8" else gray16
            # beside the prepared and stats folders: lineage paths stay inside the parent folder
            made[key] = normalize(
                fx, fx.prepared.parent / ("norm-" + "-".join(key)), mode, dtype, scale
            )
        return made[key]

    return get


def stored(folder: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(folder / "images.zarr" / "images", mode="r")[...])


@pytest.fixture
def fresh(rgb8: Fitted, tmp_path: Path) -> tuple[Path, Path]:
    """A per_channel store of this test's own, made from this test's own copy of the stats."""
    stats = tmp_path / "stats"
    shutil.copytree(rgb8.stats, stats)
    return normalize(rgb8, tmp_path / "normalized", "per_channel", stats=stats), stats


# --- dataset protocol --------------------------------------------------------------------------


def test_len_and_items(rgb8: Fitted, make: Make) -> None:
    folder = make("rgb8", "per_pixel")
    ds = open_normalized(folder)
    data = stored(folder)
    assert len(ds) == len(rgb8.images) == 30
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.dtype == np.float32
        assert image.shape == (H, W, 3)
        np.testing.assert_array_equal(image, data[i])
        assert type(label) is int
        assert label == rgb8.labels[i]
    assert [lab for _, lab in ds] == rgb8.labels.tolist()  # plain iteration stops at the end


def test_store_path_is_accepted_too(make: Make) -> None:
    folder = make("rgb8", "per_channel")
    ds = open_normalized(folder / "images.zarr")
    np.testing.assert_array_equal(ds[3][0], stored(folder)[3])


def test_negative_index_and_index_error(make: Make) -> None:
    folder = make("rgb8", "per_channel")
    ds = open_normalized(folder)
    data = stored(folder)
    np.testing.assert_array_equal(ds[-1][0], data[-1])
    np.testing.assert_array_equal(ds[-30][0], data[0])
    np.testing.assert_array_equal(ds[np.int64(5)][0], data[5])
    for bad in (30, 31, -31):
        with pytest.raises(IndexError):
            ds[bad]


@pytest.mark.parametrize("name", ["train", "val", "test"])
def test_splits(rgb8: Fitted, make: Make, name: str) -> None:
    folder = make("rgb8", "per_channel")
    data = stored(folder)
    view = open_normalized(folder).split(name)
    start, stop = rgb8.splits[name]
    assert stop > start  # every split has samples in this fixture
    assert len(view) == stop - start
    for j in range(len(view)):
        image, label = view[j]
        np.testing.assert_array_equal(image, data[start + j])
        assert label == rgb8.labels[start + j]
    np.testing.assert_array_equal(view[-1][0], data[stop - 1])
    with pytest.raises(IndexError):
        view[stop - start]
    np.testing.assert_array_equal(view.labels, rgb8.labels[start:stop])
    np.testing.assert_array_equal(view.dask().compute(), data[start:stop])
    assert len(view.split(name)) == len(view)


def test_split_sizes_add_up(rgb8: Fitted, make: Make) -> None:
    ds = open_normalized(make("rgb8", "per_channel"))
    assert sum(len(ds.split(s)) for s in ("train", "val", "test")) == len(ds)
    assert rgb8.splits == {"train": [0, 23], "val": [23, 27], "test": [27, 30]}


def test_split_of_a_disjoint_split_is_empty(make: Make) -> None:
    ds = open_normalized(make("rgb8", "per_channel"))
    assert len(ds.split("test").split("train")) == 0


@pytest.mark.parametrize("name", ["Train", "validation", "all", ""])
def test_unknown_split_raises_key_error(make: Make, name: str) -> None:
    ds = open_normalized(make("rgb8", "per_channel"))
    with pytest.raises(KeyError, match="unknown split"):
        ds.split(name)


def test_labels_and_classes(rgb8: Fitted, make: Make) -> None:
    ds = open_normalized(make("rgb8", "per_channel"))
    np.testing.assert_array_equal(ds.labels, rgb8.labels)
    assert ds.classes == rgb8.classes == ["ant", "bee", "cow"]
    names = [ds.classes[label] for label in ds.labels]
    paths = zarr.open_array(rgb8.prepared / "images.zarr" / "path", mode="r")[...]
    assert names == [str(p).split("/")[0] for p in paths]


def test_dask_view_equals_the_stored_data(make: Make) -> None:
    folder = make("rgb8", "per_image_per_channel", "float16")
    ds = open_normalized(folder)
    arr = ds.dask()
    assert arr.shape == (30, H, W, 3)
    assert arr.dtype == np.float16
    assert arr.chunks[0] == (2,) * 15  # one block per store chunk
    np.testing.assert_array_equal(arr.compute(scheduler="threads", num_workers=2), stored(folder))


def test_lineage_is_a_plain_dict(rgb8: Fitted, make: Make) -> None:
    ds = open_normalized(make("rgb8", "min_max", "float16", "unit"))
    info = ds.lineage
    assert type(info) is dict
    assert json.loads(json.dumps(info)) == info
    assert (info["mode"], info["dtype"], info["input_scale"]) == ("min_max", "float16", "unit")
    sha = hashlib.sha256((rgb8.stats / "stats.json").read_bytes()).hexdigest()
    assert info["stats"]["sha256"] == sha
    prepared = json.loads((rgb8.prepared / "images.zarr" / "zarr.json").read_text())
    assert info["prepared"]["fingerprint"] == prepared["attributes"]["fingerprint"]
    assert {"numpy", "pillow", "zarr", "dask", "pipeline"} <= set(info["versions"])
    info["stats"]["sha256"] = "changed by the caller"
    assert ds.lineage["stats"]["sha256"] == sha  # a copy each time


def test_channels_first(make: Make) -> None:
    folder = make("rgb8", "per_channel")
    data = stored(folder)
    ds = open_normalized(folder, channels_first=True)
    image, _ = ds[4]
    assert image.shape == (3, H, W)
    assert image.flags.c_contiguous
    np.testing.assert_array_equal(image, data[4].transpose(2, 0, 1))
    assert ds.split("val")[0][0].shape == (3, H, W)


def test_pickles_by_path(make: Make) -> None:
    folder = make("rgb8", "per_channel")
    view = open_normalized(folder, channels_first=True).split("val")
    view[0]  # opened arrays are not part of the pickle
    clone = pickle.loads(pickle.dumps(view))
    assert len(clone) == len(view)
    np.testing.assert_array_equal(clone[1][0], view[1][0])


# --- denormalize -------------------------------------------------------------------------------

CONFIGS = [
    ("rgb8", "float32", "pixel"),
    ("rgb8", "float16", "pixel"),
    ("rgb8", "float16", "unit"),
    ("gray16", "float32", "unit"),
    ("gray16", "float32", "pixel"),
]


@pytest.mark.parametrize(("data", "dtype", "scale"), CONFIGS, ids=["-".join(c) for c in CONFIGS])
@pytest.mark.parametrize("mode", MODES)
def test_denormalize_returns_the_prepared_pixels(
    rgb8: Fitted, gray16: Fitted, make: Make, mode: str, data: str, dtype: str, scale: str
) -> None:
    fx = rgb8 if data == "rgb8" else gray16
    folder = make(data, mode, dtype, scale)
    ds = open_normalized(folder)
    y = stored(folder)
    for i in range(len(ds)):
        index = i if mode in PER_IMAGE else None
        back = ds.denormalize(ds[i][0], index=index)
        assert back.dtype == fx.images.dtype
        np.testing.assert_array_equal(back, fx.images[i])
        one = ds.denormalize(y[i : i + 1], index=index)  # a batch of one
        np.testing.assert_array_equal(one, fx.images[i : i + 1])
    if mode not in PER_IMAGE:
        np.testing.assert_array_equal(ds.denormalize(y), fx.images)  # the whole batch
    # views index relative to themselves; channels_first takes and returns (C, H, W)
    start, _ = fx.splits["val"]
    view = open_normalized(folder, channels_first=True).split("val")
    for j in (0, -1):
        index = j if mode in PER_IMAGE else None
        back = view.denormalize(view[j][0], index=index)
        np.testing.assert_array_equal(back, fx.images[start + j % len(view)].transpose(2, 0, 1))
    if mode not in PER_IMAGE:
        batch = np.stack([view[j][0] for j in range(len(view))])
        expected = fx.images[start : start + len(view)].transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(view.denormalize(batch), expected)


@pytest.mark.parametrize("mode", PER_IMAGE)
def test_per_image_denormalize_needs_the_index(make: Make, mode: str) -> None:
    ds = open_normalized(make("rgb8", mode))
    with pytest.raises(ValueError, match="index"):
        ds.denormalize(ds[0][0])
    with pytest.raises(IndexError):
        ds.denormalize(ds[0][0], index=30)


# --- refusal -----------------------------------------------------------------------------------


def change_a_digit_of_a_mean(stats_json: Path) -> None:
    text = stats_json.read_text()
    match = re.search(r'"mean": (\d+\.\d*?)(\d)(\d),', text)
    assert match is not None
    digit = str((int(match[2]) + 1) % 10)
    new = text[: match.start(2)] + digit + text[match.end(2) :]
    json.loads(new)  # still valid JSON, only one number changed
    stats_json.write_text(new)


def test_tampered_stats_file_is_refused_unless_verify_is_off(fresh: tuple[Path, Path]) -> None:
    folder, stats = fresh
    expected = stored(folder)
    change_a_digit_of_a_mean(stats / "stats.json")
    with pytest.raises(StoreError, match="sha256"):
        open_normalized(folder)
    ds = open_normalized(folder, verify=False)
    np.testing.assert_array_equal(ds[7][0], expected[7])
    assert len(ds) == 30


def test_changed_stats_arrays_are_refused(fresh: tuple[Path, Path]) -> None:
    folder, stats = fresh
    g = zarr.open_group(stats / "stats.zarr", mode="r+")
    g["mean_image"][0, 0, 0] = 1.5
    with pytest.raises(StoreError):
        open_normalized(folder)


def test_missing_stats_file_is_named(fresh: tuple[Path, Path]) -> None:
    folder, stats = fresh
    (stats / "stats.json").unlink()
    with pytest.raises(StoreError, match="missing") as info:
        open_normalized(folder)
    assert str((stats / "stats.json").resolve()) in str(info.value)
    assert len(open_normalized(folder, verify=False)) == 30


def _edit(attrs: dict[str, Any], key: str, value: Any) -> None:
    *path, last = key.split(".")
    node = attrs
    for part in path:
        node = node[part]
    node[last] = value(node[last]) if callable(value) else value


EDITS = [
    pytest.param("constants.offset", lambda v: [x + 1 for x in v], id="constants-offset"),
    pytest.param("constants.scale", lambda v: [x * 2 for x in v], id="constants-scale"),
    pytest.param("stats.params.stats.zero_std", "eps", id="stats-params"),
    pytest.param("stats.sha256", "0" * 64, id="stats-sha256"),
    pytest.param("prepared.fingerprint", "f" * 64, id="prepared-fingerprint"),
    pytest.param("mode", "mean_only", id="mode"),
    pytest.param("mode", "per_image", id="mode-per-image"),
    pytest.param("input_scale", "unit", id="input-scale"),
    pytest.param("dtype", "float16", id="dtype"),
    pytest.param("divisor", 255.0, id="divisor"),
    pytest.param("pixel_max", 65535, id="pixel-max"),
    pytest.param("stats.mean", lambda v: [x + 1 for x in v], id="stats-mean"),
]


@pytest.mark.parametrize(("key", "value"), EDITS)
def test_edited_store_attribute_is_refused(fresh: tuple[Path, Path], key: str, value: Any) -> None:
    folder, _ = fresh
    store = folder / "images.zarr"
    open_normalized(folder)  # accepted before the edit
    group = zarr.open_group(store, mode="r+")
    attrs = json.loads(json.dumps(group.attrs.asdict()))
    _edit(attrs, key, value)
    group.attrs.put(attrs)
    with pytest.raises(StoreError):
        open_normalized(folder)
    assert len(open_normalized(folder, verify=False)) == 30


def test_edited_offset_array_is_refused(fresh: tuple[Path, Path]) -> None:
    folder, _ = fresh
    offset = zarr.open_array(folder / "images.zarr" / "offset", mode="r+")
    offset[0] = offset[0] + 0.5
    with pytest.raises(StoreError, match="constants"):
        open_normalized(folder)


def test_prepared_store_is_not_a_normalized_store(rgb8: Fitted, tmp_path: Path) -> None:
    for path in (rgb8.prepared, rgb8.prepared / "images.zarr"):
        with pytest.raises(StoreError, match="not a normalized store"):
            open_normalized(path)
    with pytest.raises(StoreError):
        open_normalized(tmp_path / "nothing-here")


# --- PyTorch -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "channels_first"), [(0, False), (0, True), (2, False), (2, True)]
)
def test_torch_dataloader(rgb8: Fitted, make: Make, workers: int, channels_first: bool) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    folder = make("rgb8", "per_pixel")
    data = stored(folder)
    ds = open_normalized(folder, channels_first=channels_first)
    view = ds.split("train") if workers else ds  # a view pickles/forks like the whole store
    start, stop = rgb8.splits["train"] if workers else (0, len(ds))
    kwargs: dict[str, Any] = {"timeout": 120} if workers else {}
    loader = DataLoader(view, batch_size=4, num_workers=workers, **kwargs)
    images, labels = [], []
    for x, y in loader:
        assert x.dtype == torch.float32
        assert tuple(x.shape[1:]) == ((3, H, W) if channels_first else (H, W, 3))
        assert x.shape[0] == len(y)
        images.append(x.numpy())
        labels.append(y.numpy())
    sizes = [len(b) for b in images]
    assert sizes[:-1] == [4] * (len(sizes) - 1)
    assert 1 <= sizes[-1] <= 4
    expected = data[start:stop]
    if channels_first:
        expected = expected.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(np.concatenate(images), expected)
    np.testing.assert_array_equal(np.concatenate(labels), rgb8.labels[start:stop])


class PerItem:
    """The same dataset without ``__getitems__``: DataLoader then fetches item by item."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        return self.ds[i]


@pytest.mark.parametrize(("workers", "channels_first"), [(0, False), (2, True)])
def test_shuffled_dataloader_batches_equal_per_item_fetching(
    make: Make, workers: int, channels_first: bool
) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    folder = make("rgb8", "per_channel")
    ds = open_normalized(folder, channels_first=channels_first)
    kwargs: dict[str, Any] = {"timeout": 120} if workers else {}
    batches = []
    for dataset in (ds, PerItem(ds)):
        torch.manual_seed(7)  # the same shuffle for both loaders
        loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=workers, **kwargs)
        batches.append([(x.clone(), y.clone()) for x, y in loader])
    fast, slow = batches
    assert len(fast) == len(slow) >= 1
    for (x, y), (x1, y1) in zip(fast, slow, strict=True):
        assert x.dtype == x1.dtype
        assert y.dtype == y1.dtype
        assert x.shape == x1.shape
        assert x.numpy().tobytes() == x1.numpy().tobytes()
        assert torch.equal(y, y1)
    assert sum(len(y) for _, y in fast) == len(ds)


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_batched_read_equals_zarr(rgb8: Fitted, tmp_path: Path, codec: str) -> None:
    # beside the prepared and stats folders: lineage paths stay inside the parent folder
    folder = normalize(rgb8, rgb8.prepared.parent / f"n-{tmp_path.name}", "per_pixel", codec=codec)
    data = stored(folder)
    ds = open_normalized(folder)
    rng = np.random.default_rng(3)
    for idx in (rng.permutation(len(ds)), [5, 5, 0, -1], rng.integers(0, len(ds), 50)):
        got = ds.read(idx)
        assert got.tobytes() == data[np.asarray(idx) % len(ds)].tobytes()
        np.testing.assert_array_equal(ds.read_labels(idx), rgb8.labels[np.asarray(idx) % len(ds)])
        items = ds.__getitems__(list(idx))
        assert [lab for _, lab in items] == rgb8.labels[np.asarray(idx) % len(ds)].tolist()
    view = open_normalized(folder, channels_first=True).split("val")
    a, b = rgb8.splits["val"]
    got = view.read(np.arange(len(view))[::-1])
    assert got.tobytes() == data[a:b][::-1].transpose(0, 3, 1, 2).copy().tobytes()
    with pytest.raises(IndexError):
        view.read([len(view)])
    assert ds.read([]).shape == (0, H, W, 3)


def test_importing_pipeline_does_not_import_torch(make: Make) -> None:
    folder = make("rgb8", "per_channel")
    code = (
        "import sys, pipeline\n"
        f"ds = pipeline.open_normalized({str(folder)!r})\n"
        "ds[0]; ds.denormalize(ds[0][0]); ds.dask()\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"
