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

from pipeline.errors import StoreError
from pipeline.normalize import run_normalize
from pipeline.params import parse_params
from pipeline.reader import NormalizedDataset, open_normalized

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
