"""Scale: thousands of JPEGs through every stage on real schedulers, checked against numpy.

Marked slow: run with `make test-slow` (part of `make test`).
"""

from __future__ import annotations

import decimal
import math
import multiprocessing
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from pipeline import load_stats, open_normalized
from pipeline.ingest.stage import run_ingest
from pipeline.normalize.stage import run_normalize
from pipeline.params import parse_params
from pipeline.stats.stage import run_stats
from pipeline.tools.verify import verify_store

pytestmark = pytest.mark.slow

N_IMAGES = 3000


def _write(args: tuple[Path, int]) -> None:
    root, i = args
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:48, 0:64]
    base = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1) + rng.integers(0, 60, 3)
    img = np.clip(base + rng.normal(0, 5, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(root / f"c{i % 5}" / f"{i:05d}.jpg", quality=90)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scale") / "src"
    for c in range(5):
        (root / f"c{c}").mkdir(parents=True)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_write, [(root, i) for i in range(N_IMAGES)], chunksize=100)
    return root


def test_every_stage_at_scale(folder: Path, tmp_path: Path) -> None:
    params = parse_params(
        {
            "ingest": {"image_size": None, "chunk_images": 16, "shard_images": 64},
            "base": {"scheduler": "processes", "workers": 2},
        }
    )
    run_ingest(folder, tmp_path / "prepared", params)
    group = zarr.open_group(tmp_path / "prepared" / "images.zarr", mode="r")
    images = np.asarray(group["images"][...])
    paths = list(group["path"][...])
    assert images.shape == (N_IMAGES, 48, 64, 3)
    for i in range(0, N_IMAGES, 97):  # every 97th image against Pillow's own decode
        with Image.open(folder / paths[i]) as im:
            np.testing.assert_array_equal(images[i], np.asarray(im.convert("RGB")))
    files = [p for p in (tmp_path / "prepared").rglob("*") if p.is_file()]
    assert len(files) < 64  # 47 shards + metadata (crc32c, label, split, path), not one per image

    threads = parse_params({"base": {"scheduler": "threads", "workers": 2}})
    run_stats(tmp_path / "prepared" / "images.zarr", tmp_path / "stats", threads)
    stats = load_stats(tmp_path / "stats")
    start, stop = group.attrs["splits"]["train"]
    train = images[start:stop].astype(np.float64)
    np.testing.assert_array_equal(stats.mean, train.mean(axis=(0, 1, 2)))
    for c in range(3):  # exact oracle: numpy's float64 std drifts ~1e-12 at this size
        x = images[start:stop, ..., c].astype(np.uint64)
        n, s, ss = x.size, int(x.sum()), int((x * x).sum())
        with decimal.localcontext() as ctx:
            ctx.prec = 50
            exact = float((Decimal(n * ss - s * s) / Decimal(n * n)).sqrt())
        assert abs(stats.std[c] - exact) <= math.ulp(exact)
    np.testing.assert_allclose(stats.mean_image, train.mean(axis=0), rtol=1e-13)

    run_normalize(tmp_path / "prepared", tmp_path / "stats", tmp_path / "normalized", threads)
    ds = open_normalized(tmp_path / "normalized")
    want = ((images.astype(np.float64) - stats.mean) / stats.std).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(ds.dask()), want)
    report = verify_store(tmp_path / "normalized")
    assert report.ok
    assert report.checked == N_IMAGES
