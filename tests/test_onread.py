"""Normalize on read: a prepared store plus its stats, served as normalized values.

The values must be the bits ``pipeline normalize`` stores (the float store is the reference),
and both must equal a numpy float64 oracle computed here from the pixels within one rounding.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import MODES, PER_IMAGE, Fitted, assert_bits_equal, oracle_dataset_constants

from pipeline.core.errors import StoreError
from pipeline.normalize.stage import run_normalize
from pipeline.params import parse_params
from pipeline.reader.dataset import open_normalized

DTYPES = ("float32", "float16")
SCALES = ("pixel", "unit")
EPS = 1e-6


def normalize(fx: Fitted, out: Path, mode: str, dtype: str, scale: str, store: str) -> Path:
    """Run the real normalize stage; return its output folder."""
    p = parse_params(
        {
            "base": {"scheduler": "synchronous"},
            "normalize": {"mode": mode, "dtype": dtype, "input_scale": scale, "store": store},
        }
    )
    run_normalize(fx.prepared, fx.stats, out, p)
    return out


def oracle(fx: Fitted, mode: str, scale: str) -> np.ndarray:
    """(x - mean) / std in float64, computed here from the pixels."""
    d = float(fx.pixel_max) if scale == "unit" else 1.0
    x = fx.images.astype(np.float64) / d
    if mode in PER_IMAGE:
        axes = (1, 2, 3) if mode == "per_image" else (1, 2)
        mean = x.mean(axis=axes, keepdims=True)
        std = x.std(axis=axes, keepdims=True) + EPS
        return (x - mean) / std
    offset, spread = oracle_dataset_constants(mode, fx.train, d)
    return (x - offset) / spread


def assert_near(got: np.ndarray, want: np.ndarray, dtype: str) -> None:
    """Within the dtype's rounding of the float64 value (half an ulp, plus float64 noise)."""
    tiny = np.finfo(np.dtype(dtype)).smallest_normal
    ulp = np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
    err = np.abs(got.astype(np.float64) - want)
    assert (err <= 0.5 * np.maximum(ulp, tiny) * (1 + 1e-6) + 1e-12 * np.abs(want)).all()


CASES = list(itertools.product(MODES, DTYPES, SCALES))


@pytest.mark.parametrize(("mode", "dtype", "scale"), CASES, ids=["-".join(c) for c in CASES])
@pytest.mark.parametrize("fixture", ["rgb8", "gray16"])
def test_on_read_equals_the_float_store_bit_for_bit(
    fixture: str,
    mode: str,
    dtype: str,
    scale: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    fx: Fitted = request.getfixturevalue(fixture)
    out = normalize(fx, tmp_path / "normalized", mode, dtype, scale, "float")
    stored = np.asarray(zarr.open_array(out / "images.zarr" / "images", mode="r")[...])
    ds = open_normalized(fx.prepared, stats=fx.stats, mode=mode, dtype=dtype, input_scale=scale)
    n = len(ds)
    assert n == len(fx.images)
    order = np.random.default_rng(1).permutation(n)  # shuffled: crosses chunks and shards
    got = np.empty_like(stored)
    got[order] = ds.read(order)
    assert_bits_equal(got, stored)
    assert_near(stored, oracle(fx, mode, scale), dtype)
    assert_bits_equal(ds[3][0], stored[3])
    assert ds[3][1] == int(fx.labels[3])


# --- a lineage-only normalized store (normalize.store: lineage) --------------------------------


def project(fx: Fitted, tmp: Path, mode: str, dtype: str = "float32") -> Path:
    """A data/ folder with copies of prepared and stats, and a lineage-only normalized store."""
    data = tmp / "data"
    shutil.copytree(fx.prepared, data / "prepared")
    shutil.copytree(fx.stats, data / "stats")
    copy = Fitted(**{**vars(fx), "prepared": data / "prepared", "stats": data / "stats"})
    normalize(copy, data / "normalized", mode, dtype, "pixel", "lineage")
    return data


@pytest.mark.parametrize("mode", MODES)
def test_lineage_store_opens_like_the_float_store(rgb8: Fitted, mode: str, tmp_path: Path) -> None:
    data = project(rgb8, tmp_path, mode)
    assert not (data / "normalized" / "images.zarr" / "images").exists()  # no float copy
    float_out = normalize(rgb8, tmp_path / "float", mode, "float32", "pixel", "float")
    want = open_normalized(float_out, channels_first=True, allow_outside=True)
    got = open_normalized(data / "normalized", channels_first=True)
    assert got.on_read is not None
    assert want.on_read is None
    for name in ("train", "val", "test"):
        a, b = got.split(name), want.split(name)
        assert (len(a), a.start) == (len(b), b.start)
        idx = list(range(len(a)))[::-1]
        assert_bits_equal(a.read(idx), b.read(idx))
        items, wanted = a.__getitems__(idx), b.__getitems__(idx)
        assert [lab for _, lab in items] == [lab for _, lab in wanted]
        for (x, _), (y, _) in zip(items, wanted, strict=True):
            assert_bits_equal(x, y)
        assert_bits_equal(a.labels, b.labels)
    x0 = got[0][0]
    assert x0.shape == (rgb8.images.shape[3], *rgb8.images.shape[1:3])  # (C, H, W)
    back = got.denormalize(x0, index=0)
    assert_bits_equal(back, want.denormalize(want[0][0], index=0))
    if mode not in ("mean_only",):  # float32 round trip is exact for these small images
        assert_bits_equal(np.moveaxis(back, 0, -1), rgb8.images[0])
    # the on-read view of the prepared store (channels last) denormalizes alike
    direct = open_normalized(rgb8.prepared, stats=rgb8.stats, mode=mode)
    want_back = np.moveaxis(want.denormalize(want[5][0], index=5), 0, -1)
    assert_bits_equal(direct.denormalize(direct[5][0], index=5), want_back)


def _without(lineage: dict[str, Any]) -> dict[str, Any]:
    """A lineage minus what necessarily differs between a float store and an on-read view."""
    out = json.loads(json.dumps(lineage))
    for key in ("store",):
        out.pop(key)
    out["stats"].pop("path")
    out["prepared"].pop("path")
    out["params"]["normalize"].pop("store")
    return out


def test_lineage_dicts_match_but_for_paths_and_store(rgb8: Fitted, tmp_path: Path) -> None:
    float_out = normalize(rgb8, tmp_path / "float", "per_pixel", "float16", "unit", "float")
    want = open_normalized(float_out, allow_outside=True).lineage
    direct = open_normalized(
        rgb8.prepared, stats=rgb8.stats, mode="per_pixel", dtype="float16", input_scale="unit"
    ).lineage
    assert _without(direct) == _without(want)
    assert direct["params"]["normalize"]["store"] == "lineage"
    assert direct["prepared"]["path"] == "."
    data = project(rgb8, tmp_path, "per_pixel", "float16")
    stored = open_normalized(data / "normalized").lineage
    assert stored["params"]["normalize"]["store"] == "lineage"
    assert stored["prepared"]["path"] == "../../prepared/images.zarr"


def test_lineage_store_refuses_replaced_stats(rgb8: Fitted, tmp_path: Path) -> None:
    data = project(rgb8, tmp_path, "per_channel")
    stats_json = data / "stats" / "stats.json"
    doc = json.loads(stats_json.read_text())
    stats_json.write_text(json.dumps(doc, indent=1))  # same numbers, other bytes
    with pytest.raises(StoreError, match="stats sha256") as caught:
        open_normalized(data / "normalized")
    assert "\n" not in str(caught.value)


def test_edited_prepared_pixel_is_refused_when_read(rgb8: Fitted, tmp_path: Path) -> None:
    data = project(rgb8, tmp_path, "per_channel")
    shard = data / "prepared" / "images.zarr" / "images" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 0xFF  # the first pixel of sample 0 (chunk 0 starts the uncompressed shard)
    shard.write_bytes(bytes(raw))
    for ds in (
        open_normalized(data / "normalized"),
        open_normalized(data / "prepared", stats=data / "stats"),
    ):
        assert_bits_equal(ds.read([1, 2]), ds.read([1, 2]))  # other samples still read
        with pytest.raises(StoreError, match=r"sample\(s\) 0 do not match the digests") as e:
            ds.read([3, 0])
        assert "\n" not in str(e.value)


def test_stats_of_other_data_are_refused(rgb8: Fitted, gray16: Fitted) -> None:
    with pytest.raises(StoreError, match="fitted on other data"):
        open_normalized(rgb8.prepared, stats=gray16.stats)
    with pytest.raises(StoreError, match="pass stats="):
        open_normalized(rgb8.prepared)


def test_on_read_reads_4x_and_2x_fewer_bytes(rgb8: Fitted, tmp_path: Path) -> None:
    def shard_bytes(images_dir: Path) -> int:
        return sum(f.stat().st_size for f in (images_dir / "c").rglob("*") if f.is_file())

    prepared = shard_bytes(rgb8.prepared / "images.zarr" / "images")
    ds = open_normalized(rgb8.prepared, stats=rgb8.stats)
    direct = ds._open()["direct"]
    assert direct is not None  # uncompressed: read straight from the shard files
    assert direct.sample_bytes == int(np.prod(rgb8.images.shape[1:]))  # one byte per value
    for dtype, factor in (("float32", 4), ("float16", 2)):
        out = normalize(rgb8, tmp_path / dtype, "per_channel", dtype, "pixel", "float")
        floats = shard_bytes(out / "images.zarr" / "images")
        index = 16 * (len(rgb8.images) // 2 + 1) + 4 * 8  # per-shard indexes: a few bytes
        assert abs(floats - factor * prepared) <= factor * index


def test_verify_accepts_a_lineage_store(rgb8: Fitted, tmp_path: Path) -> None:
    from pipeline.tools.verify import verify_store

    for mode in ("per_channel", "per_image"):
        data = project(rgb8, tmp_path / mode, mode)
        report = verify_store(data / "normalized")
        assert report.ok, report.problems
        assert report.checked == len(rgb8.images)


def test_dvc_experiment_with_a_lineage_store(tmp_path: Path) -> None:
    from conftest import make_dvc_repo, run

    made = make_dvc_repo(
        tmp_path, {"sample": {"images_per_class": 2}, "ingest": {"image_size": [16, 16]}}
    )
    work, env = made.work, made.env
    run(["dvc", "repro"], work, env)
    want = open_normalized(work / "data" / "normalized")
    everything = list(range(len(want)))
    floats = want.read(everything)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "baseline"], work, env)
    out = run(["dvc", "exp", "run", "-S", "normalize.store=lineage"], work, env)
    assert "Running stage 'normalize'" in out
    assert "Running stage 'ingest'" not in out
    assert not (work / "data" / "normalized" / "images.zarr" / "images").exists()
    got = open_normalized(work / "data" / "normalized")
    assert got.on_read is not None
    assert_bits_equal(got.read(everything), floats)
    assert "checks out" in run(["pipeline", "verify", "data/normalized"], work, env)


def test_a_replaced_prepared_store_is_refused_when_opened(
    rgb8: Fitted, gray16: Fitted, tmp_path: Path
) -> None:
    data = project(rgb8, tmp_path, "per_channel")
    shutil.rmtree(data / "prepared")
    shutil.copytree(gray16.prepared, data / "prepared")
    with pytest.raises(StoreError, match="fitted on other data") as caught:
        open_normalized(data / "normalized")
    assert "\n" not in str(caught.value)


def test_compressed_prepared_store_reads_through_zarr_and_pickles(tmp_path: Path) -> None:
    import pickle

    from conftest import build, write_rgb_source

    fx = build(tmp_path, write_rgb_source, codec="zstd")
    out = normalize(fx, tmp_path / "normalized", "per_image", "float32", "unit", "float")
    stored = np.asarray(zarr.open_array(out / "images.zarr" / "images", mode="r")[...])
    ds = open_normalized(fx.prepared, stats=fx.stats, mode="per_image", input_scale="unit")
    assert ds._open()["direct"] is None  # compressed: zarr decodes the chunks
    val = pickle.loads(pickle.dumps(ds.split("val")))  # what a DataLoader worker gets
    a, b = val.start, val.stop
    assert_bits_equal(val.read(list(range(b - a))), stored[a:b])
    assert_bits_equal(ds.read([7, 2, 7]), stored[[7, 2, 7]])


def test_shuffled_batches_on_read_equal_the_float_stores(rgb8: Fitted, tmp_path: Path) -> None:
    out = normalize(rgb8, tmp_path / "normalized", "per_channel", "float32", "pixel", "float")
    want = open_normalized(out, allow_outside=True).split("train")
    got = open_normalized(rgb8.prepared, stats=rgb8.stats).split("train")
    assert got.chunk_samples == want.chunk_samples
    pairs = zip(got.batches(4, seed=3, epoch=1), want.batches(4, seed=3, epoch=1), strict=True)
    for (x, lx), (y, ly) in pairs:
        assert_bits_equal(x, y)
        assert_bits_equal(lx, ly)
