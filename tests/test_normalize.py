"""Normalize stage end to end: real PNG files, real ingest and stats, real Zarr stores on disk.

Every stored value is compared bit for bit with a numpy float64 reference computed in this file
(and conftest.py's ``oracle_dataset_constants``) from the prepared pixels (statistics of the
train split, or each image's own), rounded once to the output dtype. Layout, lineage
attributes, determinism across Dask schedulers and atomic publish are checked on the files
themselves.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import dask
import numpy as np
import PIL
import pytest
import zarr
from conftest import (
    CHUNK,
    MODES,
    PER_IMAGE,
    SHARD,
    Fitted,
    H,
    W,
    assert_bits_equal,
    oracle_dataset_constants,
)

import pipeline
from pipeline.core.errors import PipelineError, StoreError
from pipeline.normalize.stage import run_normalize
from pipeline.params import parse_params

# rgb8 / gray16 (real prepared + stats folders, built once per module): see conftest.py


def normalize(
    fx: Fitted,
    out: Path,
    mode: str,
    dtype: str = "float32",
    scale: str = "pixel",
    *,
    base: dict[str, Any] | None = None,
    stats: Path | None = None,
    prepared: Path | None = None,
    **extra: Any,
) -> Path:
    """Run the real stage; return the output store (out / images.zarr)."""
    p = parse_params(
        {
            "base": base or {"scheduler": "synchronous"},
            "normalize": {"mode": mode, "dtype": dtype, "input_scale": scale, **extra},
        }
    )
    run_normalize(prepared or fx.prepared, stats or fx.stats, out, p)
    return out / "images.zarr"


@pytest.fixture(scope="module")
def stores(rgb8: Fitted, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One float32, pixel-scale store per mode (read-only for the tests that use it)."""
    root = tmp_path_factory.mktemp("stores")
    del root  # beside the prepared and stats folders: lineage paths stay inside their parent
    return {m: normalize(rgb8, rgb8.prepared.parent / f"stores-{m}", m) for m in MODES}


# --- the oracle --------------------------------------------------------------------------------


def oracle_constants(
    mode: str, fx: Fitted, d: float, eps: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """offset and scale in input-scale units: numpy float64 over the train split, or over each
    image for the per-image modes (shapes (n, 1) or (n, C))."""
    if mode in PER_IMAGE:
        x = fx.images.astype(np.float64) / d
        if mode == "per_image":
            flat = x.reshape(len(x), -1)
            return flat.mean(axis=1)[:, None], flat.std(axis=1)[:, None] + eps
        rows = [img.reshape(-1, img.shape[-1]) for img in x]
        return (
            np.stack([r.mean(axis=0) for r in rows]),
            np.stack([r.std(axis=0) for r in rows]) + eps,
        )
    return oracle_dataset_constants(mode, fx.train, d)


def oracle(mode: str, fx: Fitted, d: float, dtype: str) -> np.ndarray:
    """dtype(((x / d) - offset) / scale), evaluated in float64 and rounded once."""
    x = fx.images.astype(np.float64) / d
    offset, scale = oracle_constants(mode, fx, d)
    if mode in PER_IMAGE:
        offset, scale = offset[:, None, None, :], scale[:, None, None, :]
    return ((x - offset) / scale).astype(dtype)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def attrs_of(store: Path) -> dict[str, Any]:
    return json.loads((store / "zarr.json").read_text())["attributes"]


# --- values ------------------------------------------------------------------------------------


def test_stats_json_holds_the_train_split_statistics(rgb8: Fitted) -> None:
    """The numbers normalize reads, checked against numpy on the train split."""
    doc = json.loads((rgb8.stats / "stats.json").read_text())
    x = rgb8.train.astype(np.float64)
    for c, name in enumerate(doc["channel_names"]):
        ch = doc["channels"][name]
        assert ch["mean"] == x[..., c].mean()  # exact integer sum, one rounding
        assert ch["std"] == pytest.approx(x[..., c].std(), rel=1e-14)
        assert (ch["min"], ch["max"]) == (x[..., c].min(), x[..., c].max())
    assert doc["global"]["mean"] == x.mean()
    assert doc["global"]["std"] == pytest.approx(x.std(), rel=1e-14)
    assert doc["count"]["images"] == len(rgb8.train)


@pytest.mark.parametrize("scale", ["pixel", "unit"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("mode", MODES)
def test_every_stored_value_equals_the_reference(
    rgb8: Fitted, tmp_path: Path, mode: str, dtype: str, scale: str
) -> None:
    store = normalize(rgb8, tmp_path / "normalized", mode, dtype, scale)
    d = 255.0 if scale == "unit" else 1.0
    stored = np.asarray(zarr.open_array(store / "images", mode="r")[...])
    assert_bits_equal(stored, oracle(mode, rgb8, d, dtype))
    assert np.isfinite(stored).all()
    offset, scale_ = oracle_constants(mode, rgb8, d)
    group = zarr.open_group(store, mode="r")
    if mode in ("per_image", "per_image_per_channel"):  # stored as (sample, channel) for both
        offset = np.broadcast_to(offset, (stored.shape[0], stored.shape[-1]))
        scale_ = np.broadcast_to(scale_, (stored.shape[0], stored.shape[-1]))
    assert group["offset"].shape == np.shape(offset)
    np.testing.assert_allclose(group["offset"][...], offset, rtol=1e-14, atol=0)
    np.testing.assert_allclose(group["scale"][...], scale_, rtol=1e-14, atol=0)


@pytest.mark.parametrize("scale", ["pixel", "unit"])
@pytest.mark.parametrize("mode", MODES)
def test_every_stored_value_equals_the_reference_16_bit(
    gray16: Fitted, tmp_path: Path, mode: str, scale: str
) -> None:
    store = normalize(gray16, tmp_path / "normalized", mode, "float32", scale)
    d = 65535.0 if scale == "unit" else 1.0
    stored = np.asarray(zarr.open_array(store / "images", mode="r")[...])
    assert_bits_equal(stored, oracle(mode, gray16, d, "float32"))


def test_eps_is_added_to_each_images_std(rgb8: Fitted, tmp_path: Path) -> None:
    """A non-default eps reaches the per-image scale (the constant image divides by eps)."""
    store = normalize(rgb8, tmp_path / "normalized", "per_image_per_channel", eps=0.5)
    x = rgb8.images.astype(np.float64)
    rows = x.reshape(len(x), -1, 3)
    expected = (x - rows.mean(axis=1)[:, None, None, :]) / (rows.std(axis=1) + 0.5)[
        :, None, None, :
    ]
    stored = np.asarray(zarr.open_array(store / "images", mode="r")[...])
    assert_bits_equal(stored, expected.astype(np.float32))
    assert attrs_of(store)["eps"] == 0.5


# --- layout and plain readers ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_layout_matches_the_prepared_store(
    rgb8: Fitted, stores: dict[str, Path], mode: str
) -> None:
    prepared = zarr.open_group(rgb8.prepared / "images.zarr", mode="r")
    out = zarr.open_group(stores[mode], mode="r")
    src, dst = prepared["images"], out["images"]
    assert isinstance(src, zarr.Array)
    assert isinstance(dst, zarr.Array)
    assert dst.shape == src.shape
    assert dst.dtype == np.float32
    assert dst.chunks == src.chunks == (CHUNK, H, W, 3)
    assert dst.shards == src.shards == (SHARD, H, W, 3)
    assert dst.metadata.dimension_names == ("sample", "y", "x", "channel")
    for name in ("label", "split", "path"):
        a, b = prepared[name], out[name]
        assert isinstance(a, zarr.Array)
        assert isinstance(b, zarr.Array)
        assert b.dtype == a.dtype
        assert b.metadata.dimension_names == a.metadata.dimension_names == ("sample",)
        assert dict(b.attrs) == dict(a.attrs)
        np.testing.assert_array_equal(b[...], a[...])
    # whole shards only: one file per shard, the last one partial
    shards = sorted((stores[mode] / "images" / "c").rglob("*"))
    files = [p for p in shards if p.is_file()]
    assert len(files) == -(-len(rgb8.images) // SHARD)


@pytest.mark.parametrize(
    "mode",
    MODES,
)
def test_xarray_and_plain_zarr_open_the_store(
    rgb8: Fitted, stores: dict[str, Path], mode: str
) -> None:
    xr = pytest.importorskip("xarray")
    expected = oracle(mode, rgb8, 1.0, "float32")
    group = zarr.open_group(stores[mode], mode="r")
    np.testing.assert_array_equal(group["images"][...], expected)
    ds = xr.open_zarr(stores[mode], consolidated=False)
    try:
        assert ds["images"].dims == ("sample", "y", "x", "channel")
        assert dict(ds.sizes) == {"sample": len(rgb8.images), "y": H, "x": W, "channel": 3}
        assert ds["images"].dtype == np.float32
        assert_bits_equal(ds["images"].values, expected)
        np.testing.assert_array_equal(ds["label"].values, group["label"][...])
        assert ds["label"].dims == ("sample",)
        assert ds.attrs["mode"] == mode
    finally:
        ds.close()


# --- lineage -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "dtype", "scale", "eps"),
    [
        ("per_channel", "float32", "pixel", 1e-6),
        ("per_pixel", "float16", "unit", 1e-3),
        ("per_image_per_channel", "float32", "unit", 0.25),
        ("min_max", "float16", "pixel", 1e-6),
    ],
)
def test_lineage_attributes(
    rgb8: Fitted, tmp_path: Path, mode: str, dtype: str, scale: str, eps: float
) -> None:
    store = normalize(rgb8, tmp_path / "normalized", mode, dtype, scale, eps=eps)
    attrs = dict(zarr.open_group(store, mode="r").attrs)
    assert json.loads(json.dumps(attrs)) == attrs  # plain JSON, nothing lost on the way
    assert attrs == attrs_of(store)
    assert (attrs["mode"], attrs["eps"], attrs["dtype"], attrs["input_scale"]) == (
        mode,
        eps,
        dtype,
        scale,
    )
    stats_bytes = (rgb8.stats / "stats.json").read_bytes()
    assert attrs["stats"]["sha256"] == hashlib.sha256(stats_bytes).hexdigest()
    assert (store / attrs["stats"]["path"]).resolve() == (rgb8.stats / "stats.json").resolve()
    prepared_attrs = attrs_of(rgb8.prepared / "images.zarr")
    assert attrs["prepared"]["fingerprint"] == prepared_attrs["fingerprint"]
    assert (store / attrs["prepared"]["path"]).resolve() == (
        rgb8.prepared / "images.zarr"
    ).resolve()
    assert attrs["classes"] == prepared_attrs["classes"] == ["ant", "bee", "cow"]
    assert attrs["splits"] == prepared_attrs["splits"]
    given = {"mode": mode, "dtype": dtype, "input_scale": scale, "eps": eps}
    assert {k: attrs["params"]["normalize"][k] for k in given} == given
    versions = attrs["versions"]
    assert versions["numpy"] == np.__version__
    assert versions["pillow"] == PIL.__version__
    assert versions["zarr"] == zarr.__version__
    assert versions["dask"] == dask.__version__
    assert versions["pipeline"] == pipeline.__version__
    assert re.fullmatch(r"[0-9a-f]{64}", attrs["code_sha256"])
    # the constants applied: inline when per channel, always as arrays in the group
    d = 255.0 if scale == "unit" else 1.0
    offset, scale_ = oracle_constants(mode, rgb8, d, eps)
    if offset.ndim == 1:
        np.testing.assert_allclose(attrs["constants"]["offset"], offset, rtol=1e-14, atol=0)
        np.testing.assert_allclose(attrs["constants"]["scale"], scale_, rtol=1e-14, atol=0)
    group = zarr.open_group(store, mode="r")
    np.testing.assert_allclose(group["offset"][...], offset, rtol=1e-14, atol=0)
    np.testing.assert_allclose(group["scale"][...], scale_, rtol=1e-14, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_no_timestamps_in_any_metadata(stores: dict[str, Path], mode: str) -> None:
    today = datetime.date.today()
    for meta in stores[mode].rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        attrs = doc.get("attributes", {})
        # library versions such as dask 2026.8.0 legitimately look like years
        attrs.pop("versions", None)
        attrs.get("prepared", {}).pop("versions", None)
        text = json.dumps(doc)
        assert str(today.year) not in text, meta
        assert not re.search(r"\d{4}-\d\d-\d\d|\d\d:\d\d(:\d\d)?|\d{8}T\d{4}", text), meta
        keys = re.findall(r'"([^"]+)":', text)
        assert not [k for k in keys if re.search(r"time|date|created|host|user", k, re.I)]


# --- determinism and atomic publish -----------------------------------------------------------


def test_byte_identical_across_schedulers_and_runs(rgb8: Fitted, tmp_path: Path) -> None:
    bases = {
        "synchronous": {"scheduler": "synchronous"},
        "threads-1": {"scheduler": "threads", "workers": 1},
        "threads-2": {"scheduler": "threads", "workers": 2},
        "processes-2": {"scheduler": "processes", "workers": 2},
    }
    trees = {}
    for name, base in bases.items():
        out = tmp_path / name / "normalized"  # same depth: same relative lineage paths
        normalize(rgb8, out, "per_image_per_channel", "float16", "unit", base=base)
        trees[name] = tree(out)
    first = trees["synchronous"]
    assert any(k.startswith("images.zarr/images/c/") for k in first)
    for name, t in trees.items():
        assert t.keys() == first.keys(), name
        changed = [k for k in t if t[k] != first[k]]
        assert not changed, (name, changed)
    # a second run over the same output replaces it with identical bytes
    out = tmp_path / "synchronous" / "normalized"
    normalize(rgb8, out, "per_image_per_channel", "float16", "unit")
    assert tree(out) == first
    assert not list(out.parent.glob(".normalized.*"))


def damage_last_shard(prepared: Path) -> None:
    folder = prepared / "images.zarr" / "images" / "c"
    last = sorted(p for p in folder.rglob("*") if p.is_file())[-1]
    data = bytearray(last.read_bytes())
    data[7] ^= 0xFF  # a pixel of sample 28, changed in place: the shard index still checks out
    last.write_bytes(bytes(data))


@pytest.mark.parametrize("failure", ["fingerprint", "stats-schema", "damaged-shard"])
def test_failed_run_leaves_previous_output_unchanged(
    rgb8: Fitted, gray16: Fitted, tmp_path: Path, failure: str
) -> None:
    out = tmp_path / "normalized"
    normalize(rgb8, out, "per_channel")
    before = tree(out)
    stats, prepared = rgb8.stats, rgb8.prepared
    if failure == "fingerprint":  # stats fitted on another prepared store
        stats = gray16.stats
        expect: tuple[type[Exception], str] = (PipelineError, "fitted on other data")
    elif failure == "stats-schema":
        stats = tmp_path / "stats"
        shutil.copytree(rgb8.stats, stats)
        doc = json.loads((stats / "stats.json").read_text())
        doc["schema"] = "pipeline.stats/0"
        (stats / "stats.json").write_text(json.dumps(doc))
        expect = (StoreError, "schema")
    else:  # fails while writing shards: inside the temporary folder
        prepared = tmp_path / "prepared"
        shutil.copytree(rgb8.prepared, prepared)
        damage_last_shard(prepared)
        expect = (StoreError, r"sample\(s\) 28 do not match the digests ingest recorded")
    with pytest.raises(expect[0], match=expect[1]):
        normalize(rgb8, out, "per_pixel", "float16", stats=stats, prepared=prepared)
    assert tree(out) == before
    assert not list(tmp_path.glob(".normalized.tmp-*"))
    assert not list(tmp_path.glob(".normalized.old-*"))


def test_float16_store_has_half_the_bytes(rgb8: Fitted, tmp_path: Path) -> None:
    s32 = normalize(rgb8, tmp_path / "f32" / "normalized", "per_channel", "float32")
    s16 = normalize(rgb8, tmp_path / "f16" / "normalized", "per_channel", "float16")
    t32, t16 = ({k: len(v) for k, v in tree(s / "images" / "c").items()} for s in (s32, s16))
    assert t32.keys() == t16.keys()
    assert len(t32) == -(-len(rgb8.images) // SHARD)
    # no codec: a shard is its chunks' raw bytes plus an index of 16 bytes per chunk + crc32c
    index = (SHARD // CHUNK) * 16 + 4
    for name in t32:
        assert t32[name] - index == 2 * (t16[name] - index), name
    data32 = sum(t32.values()) - index * len(t32)
    assert data32 == rgb8.images.size * 4
