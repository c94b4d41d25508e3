"""Stats stage end to end: Pillow-made PNGs -> run_ingest -> run_stats, real Zarr and Dask.

The oracle is the pixels this file generated itself (PNG is lossless), grouped by split with the
manifest, reduced with ``fractions.Fraction`` and numpy float64 -- never the stage's own output.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from PIL import Image

from pipeline.core.errors import ParamsError, PipelineError, StoreError
from pipeline.ingest.stage import run_ingest
from pipeline.params import Params, parse_params
from pipeline.stats.document import load_stats
from pipeline.stats.stage import run_stats

HEIGHT, WIDTH = 10, 12  # not square: a transposed axis would show
SPLIT = {"val": 0.2, "test": 0.2}  # with these 30 names: 19 train, 8 val, 3 test
NAMES = ("R", "G", "B")
DEFAULT_PERCENTILES = (1.0, 5.0, 50.0, 95.0, 99.0)


def make_params(
    *,
    stats: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    split: dict[str, Any] | None = None,
) -> Params:
    return parse_params(
        {
            "base": base or {"scheduler": "synchronous"},
            "ingest": {
                "image_size": None,
                "chunk_images": 2,
                "shard_images": 4,
                "split": split or SPLIT,
            },
            "stats": stats or {},
        }
    )


@dataclass(frozen=True)
class Prepared:
    """A prepared store made by run_ingest, plus the pixels written into its PNGs."""

    path: Path  # .../prepared/images.zarr: what run_stats takes
    pixels: dict[str, np.ndarray]  # relpath -> (H, W, 3) uint8
    manifest: list[dict[str, Any]]  # store order

    def fit_pixels(self, split: str) -> np.ndarray:
        """Oracle input: the generated pixels of ``split`` ("all": every sample), store order."""
        rows = [r for r in self.manifest if split in ("all", r["split"])]
        return np.stack([self.pixels[r["path"]] for r in rows])


def build_store(root: Path, images: dict[str, np.ndarray], split: dict[str, Any]) -> Prepared:
    src = root / "src"
    src.mkdir(parents=True)
    for name, pixels in images.items():
        Image.fromarray(pixels, mode="RGB").save(src / name)
    run_ingest(src, root / "prepared", make_params(split=split))
    lines = (root / "prepared" / "manifest.jsonl").read_text().splitlines()
    manifest = sorted((json.loads(line) for line in lines), key=lambda r: r["index"])
    return Prepared(path=root / "prepared" / "images.zarr", pixels=images, manifest=manifest)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """30 RGB PNGs, 10x12, each with its own brightness and spread; 8 shards of 4."""
    rng = np.random.default_rng(2024)
    images = {}
    for i in range(30):
        centre = rng.integers(30, 226, size=3)
        spread = rng.integers(1, 40)
        noise = rng.integers(-spread, spread + 1, (HEIGHT, WIDTH, 3))
        images[f"img_{i:02d}.png"] = np.clip(centre + noise, 0, 255).astype(np.uint8)
    images["img_05.png"][0, 0] = (0, 255, 0)  # extremes somewhere
    prepared = build_store(tmp_path_factory.mktemp("rgb"), images, SPLIT)
    counts = {s: sum(r["split"] == s for r in prepared.manifest) for s in ("train", "val", "test")}
    assert counts == {"train": 19, "val": 8, "test": 3}
    return prepared


@pytest.fixture(scope="module")
def flat_green(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """20 PNGs whose green channel is 77 everywhere; no val split (ingest.split.val: 0)."""
    rng = np.random.default_rng(77)
    images = {}
    for i in range(20):
        a = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        a[..., 1] = 77
        images[f"img_{i:02d}.png"] = a
    prepared = build_store(tmp_path_factory.mktemp("flat"), images, {"val": 0.0, "test": 0.2})
    assert not any(r["split"] == "val" for r in prepared.manifest)
    return prepared


@pytest.fixture(scope="module")
def reference(store: Prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One stats run with default stats params on the synchronous scheduler."""
    out = tmp_path_factory.mktemp("ref") / "stats"
    run_stats(store.path, out, make_params())
    return out


# --- oracles and helpers ---------------------------------------------------------------------


def sqrt_oracle(var: Fraction) -> float:
    with localcontext() as ctx:
        ctx.prec = 50
        return float((Decimal(var.numerator) / Decimal(var.denominator)).sqrt())


def exact(values: np.ndarray) -> tuple[int, int, int]:
    """(count, sum, sum of squares) as Python ints."""
    v = values.reshape(-1).astype(object)
    return len(v), int(v.sum()), int((v * v).sum())


def std_oracle(values: np.ndarray) -> float:
    n, s, ss = exact(values)
    return sqrt_oracle(Fraction(n * ss - s * s, n * n))


def nearest_rank(values: np.ndarray, q: float) -> int:
    ordered = np.sort(values.reshape(-1))
    return int(ordered[max(1, math.ceil(Fraction(repr(q)) * len(ordered) / 100)) - 1])


def digests(out_dir: Path) -> dict[str, str]:
    """sha256 of every file under the output folder, by relative path (hidden leftovers too)."""
    return {
        p.relative_to(out_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out_dir.rglob("*"))
        if p.is_file()
    }


def read_doc(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "stats.json").read_text())


def check_against_oracle(out_dir: Path, prepared: Prepared, split: str) -> None:
    """stats.json, stats.zarr and load_stats against Fraction / numpy float64 on ``split``."""
    x = prepared.fit_pixels(split)
    xf = x.astype(np.float64)
    n = len(x)
    doc = read_doc(out_dir)
    group_attrs = zarr.open_group(prepared.path, mode="r").attrs
    assert doc["schema"] == "pipeline.stats/1"
    assert doc["fit_split"] == split
    assert doc["non_train_fit"] is (split != "train")
    assert doc["fingerprint"] == group_attrs["fingerprint"]
    assert doc["pixel_max"] == 255
    assert doc["channel_names"] == list(NAMES)
    assert doc["count"] == {
        "images": n,
        "pixels_per_channel": n * HEIGHT * WIDTH,
        "prepared_images": len(prepared.manifest),
    }
    for c, name in enumerate(NAMES):
        ch = doc["channels"][name]
        count, total, _ = exact(x[..., c])
        assert ch["mean"] == float(Fraction(total, count))
        std = std_oracle(x[..., c])
        assert abs(ch["raw_std"] - std) <= math.ulp(std)
        assert ch["std"] == ch["raw_std"] > 0
        assert ch["zero_std"] is False
        np.testing.assert_allclose(ch["std"], xf[..., c].std(), rtol=1e-12, atol=0)
        assert (ch["min"], ch["max"]) == (int(x[..., c].min()), int(x[..., c].max()))
        assert ch["mean_01"] == ch["mean"] / 255
        assert ch["std_01"] == ch["std"] / 255
        assert ch["percentiles"] == {
            f"p{q:g}": nearest_rank(x[..., c], q) for q in DEFAULT_PERCENTILES
        }
        per_image = xf[..., c].reshape(n, -1).std(axis=1).mean()
        np.testing.assert_allclose(ch["mean_of_image_stds"], per_image, rtol=1e-12, atol=0)
    count, total, _ = exact(x)
    assert doc["global"]["mean"] == float(Fraction(total, count))
    expected = std_oracle(x)
    assert abs(doc["global"]["std"] - expected) <= math.ulp(expected)

    # The arrays, read with plain zarr.
    arrays = zarr.open_group(out_dir / "stats.zarr", mode="r")
    sums = x.astype(np.int64).sum(axis=0)
    assert np.array_equal(arrays["pixel_sum"][...], sums)
    assert np.array_equal(arrays["pixel_sumsq"][...], (x.astype(np.int64) ** 2).sum(axis=0))
    np.testing.assert_allclose(arrays["raw_std_image"][...], xf.std(axis=0), rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        arrays["image_std"][...], xf.reshape(n, -1, 3).std(axis=1), rtol=1e-12, atol=0
    )

    # What a training job sees.
    stats = load_stats(out_dir)
    assert np.array_equal(stats.mean, [doc["channels"][k]["mean"] for k in NAMES])
    assert np.array_equal(stats.std, [doc["channels"][k]["std"] for k in NAMES])
    assert stats.mean.dtype == stats.std.dtype == np.float64
    assert stats.pixel_max == 255
    assert np.array_equal(stats.mean_image, sums / n)
    std_image = xf.std(axis=0)
    np.testing.assert_allclose(
        stats.std_image, np.where(std_image > 0, std_image, 1.0), rtol=1e-12, atol=0
    )
    assert stats.count == n
    assert stats.fit_split == split
    assert stats.fingerprint == group_attrs["fingerprint"]
    assert stats.channels == list(NAMES)
    assert np.array_equal(stats.minimum, x.reshape(-1, 3).min(axis=0))
    assert np.array_equal(stats.maximum, x.reshape(-1, 3).max(axis=0))
    for c in range(3):
        assert np.array_equal(stats.histogram[c], np.bincount(x[..., c].ravel(), minlength=256))
    assert stats.global_mean == doc["global"]["mean"]
    assert stats.sha256 == hashlib.sha256((out_dir / "stats.json").read_bytes()).hexdigest()


# --- against the oracle ------------------------------------------------------------------------


def test_oracle_premise_store_holds_the_png_pixels(store: Prepared) -> None:
    """The oracle's inputs: the store (plain zarr) holds our pixels in manifest order, by split."""
    images = zarr.open_array(store.path / "images", mode="r")
    assert images.shape == (30, HEIGHT, WIDTH, 3)
    assert np.array_equal(images[...], store.fit_pixels("all"))
    splits = dict(zarr.open_group(store.path, mode="r").attrs["splits"])
    assert splits == {"train": [0, 19], "val": [19, 27], "test": [27, 30]}
    for name, (a, b) in splits.items():
        assert [r["split"] for r in store.manifest[a:b]] == [name] * (b - a)


def test_train_fit_matches_oracle(store: Prepared, reference: Path) -> None:
    check_against_oracle(reference, store, "train")
    names = sorted(p.name for p in reference.iterdir())
    assert names == ["metrics.json", "stats.json", "stats.zarr"]


def test_metrics_file_holds_only_the_numbers_of_stats_json(reference: Path) -> None:
    doc = json.loads((reference / "stats.json").read_text())
    metrics = json.loads((reference / "metrics.json").read_text())
    assert list(metrics) == ["train"]
    train = metrics["train"]
    assert train["images"] == doc["count"]["images"]
    assert train["pixels_per_channel"] == doc["count"]["pixels_per_channel"]
    assert train["prepared_images"] == doc["count"]["prepared_images"]
    assert set(train) == {"images", "pixels_per_channel", "prepared_images", *doc["channel_names"]}
    for name in doc["channel_names"]:
        assert train[name] == {k: doc["channels"][name][k] for k in ("mean", "std", "min", "max")}

    def leaves(value: object) -> list[object]:
        if isinstance(value, dict):
            return [leaf for v in value.values() for leaf in leaves(v)]
        return [value]

    assert all(type(v) in (int, float) for v in leaves(metrics))


def test_load_stats_accepts_the_json_path(reference: Path) -> None:
    assert load_stats(reference / "stats.json").doc == load_stats(reference).doc


# --- bit-identical for any blocking, tree and scheduler ----------------------------------------

CONFIGS = {
    "block1": ({"block_images": 1}, None),
    "block3": ({"block_images": 3}, None),
    "block4": ({"block_images": 4}, None),
    "block7": ({"block_images": 7}, None),
    "block-null": ({"block_images": None}, None),
    "every2": ({"block_images": 1, "split_every": 2}, None),
    "every8": ({"block_images": 1, "split_every": 8}, None),
    "synchronous": ({"block_images": 3}, {"scheduler": "synchronous"}),
    "threads-1": ({"block_images": 3}, {"scheduler": "threads", "workers": 1}),
    "threads-2": ({"block_images": 3, "split_every": 2}, {"scheduler": "threads", "workers": 2}),
    "processes-2": (
        {"block_images": 3, "split_every": 3},
        {"scheduler": "processes", "workers": 2},
    ),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_outputs_bit_identical(
    config: str, store: Prepared, reference: Path, tmp_path: Path
) -> None:
    stats, base = CONFIGS[config]
    out = tmp_path / "stats"
    doc = run_stats(store.path, out, make_params(stats=stats, base=base)).document
    assert digests(out) == digests(reference)
    assert doc == read_doc(reference)


# --- fit split ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["val", "test", "all"])
def test_non_train_fit_needs_the_override(split: str) -> None:
    with pytest.raises(ParamsError, match="allow_non_train_fit"):
        make_params(stats={"fit_split": split})


@pytest.mark.parametrize("split", ["val", "test", "all"])
def test_non_train_fit_with_override(split: str, store: Prepared, tmp_path: Path) -> None:
    out = tmp_path / "stats"
    run_stats(store.path, out, make_params(stats={"fit_split": split, "allow_non_train_fit": True}))
    check_against_oracle(out, store, split)
    doc = read_doc(out)
    assert doc["non_train_fit"] is True
    assert doc["params"]["stats"]["fit_split"] == split


# --- zero variance -----------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "replacement"), [("one", 1.0), ("eps", 1e-3)])
def test_zero_variance_channel(
    policy: str, replacement: float, flat_green: Prepared, tmp_path: Path
) -> None:
    out = tmp_path / "stats"
    run_stats(flat_green.path, out, make_params(stats={"zero_std": policy, "eps": 1e-3}))
    x = flat_green.fit_pixels("train")
    doc = read_doc(out)
    green = doc["channels"]["G"]
    assert green["raw_std"] == 0.0
    assert green["zero_std"] is True
    assert green["std"] == replacement
    assert green["std_01"] == replacement / 255
    assert (green["mean"], green["min"], green["max"]) == (77.0, 77, 77)
    for c in (0, 2):
        ch = doc["channels"][NAMES[c]]
        assert ch["zero_std"] is False
        expected = std_oracle(x[..., c])
        assert abs(ch["std"] - expected) <= math.ulp(expected)
    stats = load_stats(out)
    assert stats.std[1] == replacement
    assert stats.std[0] == doc["channels"]["R"]["std"]
    assert np.all(stats.std_image[..., 1] == replacement)
    raw = zarr.open_array(out / "stats.zarr" / "raw_std_image", mode="r")[...]
    assert not raw[..., 1].any()
    np.testing.assert_allclose(raw, x.astype(np.float64).std(axis=0), rtol=1e-12, atol=0)


# --- errors ------------------------------------------------------------------------------------


def test_empty_fit_split(flat_green: Prepared, tmp_path: Path) -> None:
    params = make_params(stats={"fit_split": "val", "allow_non_train_fit": True})
    with pytest.raises(PipelineError, match=r"'val' split of .* is empty"):
        run_stats(flat_green.path, tmp_path / "stats", params)
    assert not (tmp_path / "stats").exists()


def _empty_folder(tmp: Path, store: Prepared) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _plain_group(tmp: Path, store: Prepared) -> Path:
    zarr.open_group(tmp / "plain.zarr", mode="w").attrs["schema"] = "something/else"
    return tmp / "plain.zarr"


def _no_images(tmp: Path, store: Prepared) -> Path:
    shutil.copytree(store.path, tmp / "copy.zarr")
    shutil.rmtree(tmp / "copy.zarr" / "images")
    return tmp / "copy.zarr"


NOT_A_STORE: dict[str, tuple[Callable[[Path, Prepared], Path], str]] = {
    "missing": (lambda tmp, store: tmp / "nowhere", "not a Zarr store"),
    "empty-folder": (_empty_folder, "not a Zarr store"),
    "prepared-folder-not-images-zarr": (lambda tmp, store: store.path.parent, "not a Zarr store"),
    "other-schema": (_plain_group, "not a prepared store"),
    "no-images-array": (_no_images, "not a readable prepared store"),
}


@pytest.mark.parametrize("case", list(NOT_A_STORE))
def test_not_a_prepared_store(case: str, store: Prepared, tmp_path: Path) -> None:
    make, message = NOT_A_STORE[case]
    path = make(tmp_path, store)
    with pytest.raises(StoreError, match=message):
        run_stats(path, tmp_path / "stats", make_params())


SHARD = "images/c/1/0/0/0"  # samples 4..7, inside the train range


def damaged_copy(store: Prepared, tmp: Path, how: str) -> Path:
    path = tmp / "damaged" / "images.zarr"
    shutil.copytree(store.path, path)
    shard = path / SHARD
    data = shard.read_bytes()
    if how == "truncated-half":
        shard.write_bytes(data[: len(data) // 2])
    elif how == "truncated-tail":  # the shard index sits at the end
        shard.write_bytes(data[:-5])
    elif how == "empty-file":
        shard.write_bytes(b"")
    elif how == "flipped-index-byte":  # the index is crc32c-checked; raw pixel bytes are not
        shard.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        shard.unlink()
    return path


@pytest.mark.parametrize("how", ["truncated-half", "truncated-tail", "flipped-index-byte"])
def test_damaged_shard(how: str, store: Prepared, tmp_path: Path) -> None:
    path = damaged_copy(store, tmp_path, how)
    with pytest.raises(StoreError, match=re.escape(str(path / "images"))):
        run_stats(path, tmp_path / "stats", make_params())
    assert not (tmp_path / "stats").exists()


@pytest.mark.parametrize("how", ["deleted", "empty-file"])
def test_missing_shard_is_an_error(how: str, store: Prepared, tmp_path: Path) -> None:
    path = damaged_copy(store, tmp_path, how)
    with pytest.raises((StoreError, PipelineError), match=re.escape(str(path / "images"))):
        run_stats(path, tmp_path / "stats", make_params())


def _tampered(reference: Path, tmp: Path, how: str) -> Path:
    out = tmp / "copy"
    shutil.copytree(reference, out)
    arrays = out / "stats.zarr"
    chunk = arrays / "mean_image" / "c" / "0" / "0" / "0"
    if how == "modified-array-file":
        data = chunk.read_bytes()
        chunk.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif how == "deleted-array-file":
        chunk.unlink()
    elif how == "added-file":
        (arrays / "notes.txt").write_text("hello")
    elif how == "arrays-removed":
        shutil.rmtree(arrays)
    else:  # arrays replaced by those of another fit
        shutil.rmtree(arrays)
        shutil.copytree(reference.parent / "other" / "stats.zarr", arrays)
    return out


@pytest.mark.parametrize(
    "how",
    [
        "modified-array-file",
        "deleted-array-file",
        "added-file",
        "arrays-removed",
        "arrays-from-another-run",
    ],
)
def test_load_stats_refuses_mismatched_arrays(
    how: str, store: Prepared, reference: Path, tmp_path: Path
) -> None:
    other = reference.parent / "other"
    if how == "arrays-from-another-run" and not other.exists():
        run_stats(
            store.path, other, make_params(stats={"fit_split": "val", "allow_non_train_fit": True})
        )
    out = _tampered(reference, tmp_path, how)
    with pytest.raises(StoreError, match="does not match"):
        load_stats(out)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(
            lambda doc: {**doc, "schema": "pipeline.stats/0"},
            r"schema 'pipeline\.stats/0'; this version reads 'pipeline\.stats/1'",
            id="older-schema",
        ),
        pytest.param(
            lambda doc: {k: v for k, v in doc.items() if k != "schema"},
            r"schema None; this version reads 'pipeline\.stats/1'",
            id="no-schema",
        ),
        pytest.param(lambda doc: [doc], "schema None", id="not-a-mapping"),
        pytest.param(lambda doc: "{not json", "not a readable stats file", id="not-json"),
        pytest.param(None, "No stats at", id="missing"),
    ],
)
def test_load_stats_refuses_bad_json(
    content: Callable[[dict[str, Any]], Any] | None,
    message: str,
    reference: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    if content is None:
        (out / "stats.json").unlink()
    else:
        new = content(read_doc(reference))
        (out / "stats.json").write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(StoreError, match=message):
        load_stats(out)


# --- atomic publish ----------------------------------------------------------------------------


def test_failed_run_keeps_previous_outputs(
    store: Prepared, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "stats"
    shutil.copytree(reference, out)
    before = digests(out)
    damaged = damaged_copy(store, tmp_path, "truncated-half")
    with pytest.raises(StoreError):
        run_stats(damaged, out, make_params(stats={"block_images": 1}))
    assert digests(out) == before
    assert sorted(os.listdir(out)) == ["metrics.json", "stats.json", "stats.zarr"]
    load_stats(out)


def test_rerun_removes_leftover_temporary_arrays(
    store: Prepared, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "stats"
    shutil.copytree(reference, out)
    leftover = out / ".stats.zarr.tmp-0123456789ab"
    (leftover / "mean_image" / "c").mkdir(parents=True)
    (leftover / "mean_image" / "c" / "0").write_bytes(b"half-written")
    run_stats(store.path, out, make_params())
    assert sorted(os.listdir(out)) == ["metrics.json", "stats.json", "stats.zarr"]
    assert digests(out) == digests(reference)


def test_rerun_after_a_kill_during_publish(
    store: Prepared, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "stats"
    shutil.copytree(reference, out)
    shutil.copytree(reference / "stats.zarr", out / ".stats.zarr.old")  # killed mid-cleanup
    run_stats(store.path, out, make_params())
    assert sorted(os.listdir(out)) == ["metrics.json", "stats.json", "stats.zarr"]
    assert digests(out) == digests(reference)
