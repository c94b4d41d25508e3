"""params.yaml parsing: defaults, round trips, and one clear ParamsError per bad key or value."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core.errors import ParamsError, PipelineError
from pipeline.params import (
    BaseParams,
    IngestParams,
    NormalizeParams,
    Params,
    SampleParams,
    SplitParams,
    StatsParams,
    load_params,
    parse_params,
)

SECTION_CLASSES: dict[str, type] = {
    "base": BaseParams,
    "sample": SampleParams,
    "ingest": IngestParams,
    "stats": StatsParams,
    "normalize": NormalizeParams,
}

# The allowed values of each choice, written out here rather than imported from the module.
SCHEDULERS = ("auto", "threads", "processes", "synchronous")
RESIZE = ("shorter_side_center_crop", "stretch", "pad")
RESAMPLE = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
COLORS = ("rgb", "gray", "keep")
ALPHA = ("drop", "composite")
BIT_DEPTHS = (8, 16)
SPLIT_METHODS = ("hash", "folders")
ON_ERROR = ("fail", "skip")
CODECS = ("none", "zstd", "lz4")
FIT_SPLITS = ("train", "val", "test", "all")
ZERO_STD = ("one", "eps")


# --- defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param({}, id="empty-mapping"),
        pytest.param(None, id="none"),
        pytest.param(
            {"base": None, "sample": None, "ingest": None, "stats": None}, id="null-sections"
        ),
        pytest.param({"base": {}, "sample": {}, "ingest": {}, "stats": {}}, id="empty-sections"),
    ],
)
def test_defaults(raw: object) -> None:
    p = parse_params(raw)
    assert p == Params()
    assert p.base == BaseParams(scheduler="auto", workers=None)
    assert p.sample == SampleParams(seed=0, images_per_class=50)
    i = p.ingest
    assert (i.source, i.image_size, i.resize, i.resample) == (
        "data/sample",
        (224, 224),
        "shorter_side_center_crop",
        "bilinear",
    )
    assert (i.pad_value, i.color, i.alpha, i.background, i.bit_depth) == (
        (0, 0, 0),
        "rgb",
        "composite",
        (255, 255, 255),
        8,
    )
    assert i.split == SplitParams(method="hash", val=0.1, test=0.1)
    assert (i.on_error, i.max_pixels, i.chunk_images, i.shard_images) == (
        "fail",
        89_478_485,
        16,
        256,
    )
    assert (i.codec, i.codec_level) == ("none", 1)


def test_defaults_are_json_able() -> None:
    d = Params().to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["ingest"]["image_size"] == [224, 224]


# --- round trips -----------------------------------------------------------------------------

# (section, raw section mapping, the fields expected to differ from the section's defaults)
ROUND_TRIPS = [
    ("base", {"scheduler": "threads"}, {"scheduler": "threads"}),
    ("base", {"scheduler": "synchronous"}, {"scheduler": "synchronous"}),
    ("base", {"workers": 3}, {"workers": 3}),
    ("base", {"workers": None}, {}),
    ("sample", {"seed": 42}, {"seed": 42}),
    ("sample", {"images_per_class": 1}, {"images_per_class": 1}),
    ("ingest", {"source": "photos/raw"}, {"source": "photos/raw"}),
    ("ingest", {"image_size": [64, 32]}, {"image_size": (64, 32)}),
    ("ingest", {"image_size": None}, {"image_size": None}),
    ("ingest", {"resize": "stretch"}, {"resize": "stretch"}),
    ("ingest", {"resize": "pad"}, {"resize": "pad"}),
    ("ingest", {"resample": "lanczos"}, {"resample": "lanczos"}),
    ("ingest", {"pad_value": [1, 2, 3]}, {"pad_value": (1, 2, 3)}),
    ("ingest", {"pad_value": 9}, {"pad_value": (9, 9, 9)}),
    ("ingest", {"color": "keep"}, {"color": "keep"}),
    ("ingest", {"color": "gray"}, {"color": "gray"}),
    ("ingest", {"alpha": "drop"}, {"alpha": "drop"}),
    ("ingest", {"background": [0, 128, 255]}, {"background": (0, 128, 255)}),
    ("ingest", {"background": 0}, {"background": (0, 0, 0)}),
    ("ingest", {"bit_depth": 16}, {"bit_depth": 16}),
    ("ingest", {"split": {"method": "folders"}}, {"split": SplitParams(method="folders")}),
    ("ingest", {"split": {"val": 0.25}}, {"split": SplitParams(val=0.25)}),
    ("ingest", {"split": {"test": 0}}, {"split": SplitParams(test=0.0)}),
    (
        "ingest",
        {"split": {"method": "hash", "val": 0.2, "test": 0.3}},
        {"split": SplitParams(method="hash", val=0.2, test=0.3)},
    ),
    ("ingest", {"split": {}}, {}),
    ("ingest", {"on_error": "skip"}, {"on_error": "skip"}),
    ("ingest", {"max_pixels": 1000}, {"max_pixels": 1000}),
    ("ingest", {"max_file_bytes": 5000}, {"max_file_bytes": 5000}),
    ("ingest", {"chunk_images": 8}, {"chunk_images": 8}),
    ("ingest", {"shard_images": 512}, {"shard_images": 512}),
    (
        "ingest",
        {"chunk_images": 7, "shard_images": 21},
        {"chunk_images": 7, "shard_images": 21},
    ),
    ("ingest", {"codec": "zstd"}, {"codec": "zstd"}),
    ("ingest", {"codec": "lz4"}, {"codec": "lz4"}),
    ("ingest", {"codec_level": 5}, {"codec_level": 5}),
    ("ingest", {"duplicates": "drop"}, {"duplicates": "drop"}),
    (
        "stats",
        {"fit_split": "all", "allow_non_train_fit": True},
        {"fit_split": "all", "allow_non_train_fit": True},
    ),
    ("stats", {"allow_non_train_fit": True}, {"allow_non_train_fit": True}),
    ("stats", {"zero_std": "eps"}, {"zero_std": "eps"}),
    ("stats", {"eps": 0.001}, {"eps": 0.001}),
    ("stats", {"eps": 1}, {"eps": 1.0}),
    ("stats", {"percentiles": [99, 1, 50, 50]}, {"percentiles": (1.0, 50.0, 99.0)}),
    ("stats", {"block_images": 32}, {"block_images": 32}),
    ("stats", {"split_every": 4}, {"split_every": 4}),
    ("normalize", {"mode": "per_pixel"}, {"mode": "per_pixel"}),
    ("normalize", {"mode": "per_image_per_channel"}, {"mode": "per_image_per_channel"}),
    ("normalize", {"eps": 0}, {"eps": 0.0}),
    ("normalize", {"dtype": "float16"}, {"dtype": "float16"}),
    ("normalize", {"input_scale": "unit"}, {"input_scale": "unit"}),
    ("normalize", {"codec": "lz4"}, {"codec": "lz4"}),
    ("normalize", {"codec_level": 3}, {"codec_level": 3}),
    ("normalize", {"record_git_revision": True}, {"record_git_revision": True}),
    ("normalize", {"store": "lineage"}, {"store": "lineage"}),
]


@pytest.mark.parametrize(
    ("section", "raw", "changes"),
    [
        pytest.param(s, r, c, id=f"{s}-" + "-".join(f"{k}={v}" for k, v in r.items()))
        for s, r, c in ROUND_TRIPS
    ],
)
def test_key_round_trip(section: str, raw: dict[str, Any], changes: dict[str, Any]) -> None:
    p = parse_params({section: raw})
    expected_section = dataclasses.replace(SECTION_CLASSES[section](), **changes)
    assert getattr(p, section) == expected_section
    assert p == dataclasses.replace(Params(), **{section: expected_section})
    as_dict = p.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert parse_params(as_dict) == p
    assert parse_params(yaml.safe_load(yaml.safe_dump(as_dict))) == p


def test_round_trip_table_covers_every_key() -> None:
    covered = {(s, k) for s, _, changes in ROUND_TRIPS for k in changes}
    covered |= {("ingest.split", k) for _, r, _ in ROUND_TRIPS for k in r.get("split", {})}
    every = {(s, f.name) for s, cls in SECTION_CLASSES.items() for f in dataclasses.fields(cls)}
    every |= {("ingest.split", f.name) for f in dataclasses.fields(SplitParams)}
    assert every - covered == set()
    assert {f.name for f in dataclasses.fields(Params)} == set(SECTION_CLASSES)


def test_everything_changed_at_once_round_trips_through_a_file(tmp_path: Path) -> None:
    raw: dict[str, dict[str, Any]] = {}
    for section, r, _ in ROUND_TRIPS:
        raw.setdefault(section, {}).update(r)
    raw["ingest"]["split"] = {"method": "folders", "val": 0.2, "test": 0.3}
    raw["ingest"]["chunk_images"], raw["ingest"]["shard_images"] = 8, 512
    p = parse_params(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p.to_dict()), encoding="utf-8")
    assert load_params(path) == p
    assert p.ingest.split == SplitParams(method="folders", val=0.2, test=0.3)


def test_decode_dict_holds_only_what_changes_pixels() -> None:
    storage = {
        "source": "elsewhere",
        "chunk_images": 4,
        "shard_images": 8,
        "codec": "zstd",
        "codec_level": 3,
        "on_error": "skip",
    }
    base = parse_params({}).ingest.decode_dict()
    assert parse_params({"ingest": storage}).ingest.decode_dict() == base
    assert not set(storage) & set(base)
    assert parse_params({"ingest": {"bit_depth": 16}}).ingest.decode_dict() != base
    assert json.loads(json.dumps(base)) == base


# --- bad values ------------------------------------------------------------------------------

NAN = math.nan

# (section, raw section mapping, key named in the message, allowed values listed or None)
BAD_VALUES: list[Any] = [
    ("base", {"scheduler": "fast"}, "base.scheduler", SCHEDULERS),
    ("base", {"scheduler": True}, "base.scheduler", SCHEDULERS),
    ("base", {"workers": 0}, "base.workers", None),
    ("base", {"workers": -2}, "base.workers", None),
    ("base", {"workers": "4"}, "base.workers", None),
    ("base", {"workers": True}, "base.workers", None),
    ("base", {"workers": 2.5}, "base.workers", None),
    ("sample", {"seed": -1}, "sample.seed", None),
    ("sample", {"seed": "0"}, "sample.seed", None),
    ("sample", {"seed": 1.0}, "sample.seed", None),
    ("sample", {"images_per_class": 0}, "sample.images_per_class", None),
    ("ingest", {"source": ""}, "ingest.source", None),
    ("ingest", {"source": 5}, "ingest.source", None),
    ("ingest", {"source": None}, "ingest.source", None),
    ("ingest", {"image_size": [224]}, "ingest.image_size", None),
    ("ingest", {"image_size": [0, 224]}, "ingest.image_size", None),
    ("ingest", {"image_size": [224, -1]}, "ingest.image_size", None),
    ("ingest", {"image_size": "224x224"}, "ingest.image_size", None),
    ("ingest", {"image_size": 224}, "ingest.image_size", None),
    ("ingest", {"image_size": [224.0, 224]}, "ingest.image_size", None),
    ("ingest", {"image_size": [True, 224]}, "ingest.image_size", None),
    ("ingest", {"image_size": [224, 224, 3]}, "ingest.image_size", None),
    ("ingest", {"image_size": {"h": 1, "w": 2}}, "ingest.image_size", None),
    ("ingest", {"resize": "crop"}, "ingest.resize", RESIZE),
    ("ingest", {"resample": "cubic"}, "ingest.resample", RESAMPLE),
    ("ingest", {"resample": "BILINEAR"}, "ingest.resample", RESAMPLE),
    ("ingest", {"pad_value": 256}, "ingest.pad_value", None),
    ("ingest", {"pad_value": -1}, "ingest.pad_value", None),
    ("ingest", {"pad_value": [1, 2]}, "ingest.pad_value", None),
    ("ingest", {"pad_value": "black"}, "ingest.pad_value", None),
    ("ingest", {"pad_value": [0.5, 0, 0]}, "ingest.pad_value", None),
    ("ingest", {"pad_value": True}, "ingest.pad_value", None),
    ("ingest", {"color": "rgba"}, "ingest.color", COLORS),
    ("ingest", {"alpha": "keep"}, "ingest.alpha", ALPHA),
    ("ingest", {"background": [0, 0, 256]}, "ingest.background", None),
    ("ingest", {"background": "white"}, "ingest.background", None),
    ("ingest", {"bit_depth": 12}, "ingest.bit_depth", BIT_DEPTHS),
    ("ingest", {"bit_depth": "8"}, "ingest.bit_depth", BIT_DEPTHS),
    ("ingest", {"bit_depth": True}, "ingest.bit_depth", BIT_DEPTHS),
    pytest.param(
        "ingest",
        {"bit_depth": 16.0},
        "ingest.bit_depth",
        BIT_DEPTHS,
        id="ingest-bit_depth=16.0",
    ),
    ("ingest", {"split": "hash"}, "ingest.split", None),
    ("ingest", {"split": [0.1, 0.1]}, "ingest.split", None),
    ("ingest", {"split": {"method": "random"}}, "ingest.split.method", SPLIT_METHODS),
    ("ingest", {"split": {"val": 1.0}}, "ingest.split.val", None),
    ("ingest", {"split": {"val": -0.1}}, "ingest.split.val", None),
    ("ingest", {"split": {"val": "0.1"}}, "ingest.split.val", None),
    ("ingest", {"split": {"val": True}}, "ingest.split.val", None),
    ("ingest", {"split": {"val": None}}, "ingest.split.val", None),
    ("ingest", {"split": {"val": NAN}}, "ingest.split.val", None),
    ("ingest", {"split": {"test": 1.5}}, "ingest.split.test", None),
    ("ingest", {"split": {"test": -1}}, "ingest.split.test", None),
    ("ingest", {"on_error": "ignore"}, "ingest.on_error", ON_ERROR),
    ("ingest", {"on_error": False}, "ingest.on_error", ON_ERROR),
    ("ingest", {"duplicates": "merge"}, "ingest.duplicates", ("keep", "drop")),
    ("ingest", {"max_pixels": 0}, "ingest.max_pixels", None),
    ("ingest", {"max_pixels": "lots"}, "ingest.max_pixels", None),
    ("ingest", {"max_pixels": 1e9}, "ingest.max_pixels", None),
    ("ingest", {"max_file_bytes": 0}, "ingest.max_file_bytes", None),
    ("ingest", {"max_file_bytes": "1G"}, "ingest.max_file_bytes", None),
    ("ingest", {"chunk_images": 0}, "ingest.chunk_images", None),
    ("ingest", {"chunk_images": "16"}, "ingest.chunk_images", None),
    ("ingest", {"shard_images": 0}, "ingest.shard_images", None),
    ("ingest", {"shard_images": -16}, "ingest.shard_images", None),
    ("ingest", {"codec": "gzip"}, "ingest.codec", CODECS),
    ("ingest", {"codec": None}, "ingest.codec", CODECS),
    ("ingest", {"codec_level": "1"}, "ingest.codec_level", None),
    ("ingest", {"codec_level": 1.5}, "ingest.codec_level", None),
    ("stats", {"fit_split": "everything"}, "stats.fit_split", FIT_SPLITS),
    ("stats", {"fit_split": "val"}, "stats.allow_non_train_fit", None),
    ("stats", {"fit_split": "all", "allow_non_train_fit": False}, "stats.fit_split", None),
    ("stats", {"allow_non_train_fit": "yes"}, "stats.allow_non_train_fit", None),
    ("stats", {"allow_non_train_fit": 1}, "stats.allow_non_train_fit", None),
    ("stats", {"zero_std": "zero"}, "stats.zero_std", ZERO_STD),
    ("stats", {"eps": 0}, "stats.eps", None),
    ("stats", {"eps": -1e-6}, "stats.eps", None),
    ("stats", {"eps": "1e-6"}, "stats.eps", None),
    ("stats", {"eps": True}, "stats.eps", None),
    ("stats", {"eps": NAN}, "stats.eps", None),
    ("stats", {"percentiles": [101]}, "stats.percentiles", None),
    ("stats", {"percentiles": [-1, 50]}, "stats.percentiles", None),
    ("stats", {"percentiles": "50"}, "stats.percentiles", None),
    ("stats", {"percentiles": 50}, "stats.percentiles", None),
    ("stats", {"percentiles": [True]}, "stats.percentiles", None),
    ("stats", {"percentiles": [NAN]}, "stats.percentiles", None),
    ("stats", {"block_images": 0}, "stats.block_images", None),
    ("stats", {"split_every": 1}, "stats.split_every", None),
    ("normalize", {"mode": "zscore"}, "normalize.mode", ("per_channel", "per_pixel", "min_max")),
    ("normalize", {"eps": -1}, "normalize.eps", None),
    ("normalize", {"eps": NAN}, "normalize.eps", None),
    ("normalize", {"dtype": "float64"}, "normalize.dtype", ("float32", "float16")),
    ("normalize", {"input_scale": "01"}, "normalize.input_scale", ("pixel", "unit")),
    ("normalize", {"codec": "gzip"}, "normalize.codec", ("none", "zstd", "lz4")),
    ("normalize", {"record_git_revision": "yes"}, "normalize.record_git_revision", None),
    ("normalize", {"store": "uint8"}, "normalize.store", ("float", "lineage")),
]


def _bad_param(row: Any) -> Any:
    if hasattr(row, "marks"):
        return row  # already a pytest.param
    section, raw, key, allowed = row
    value = next(iter(raw.values())) if len(raw) == 1 else raw
    return pytest.param(section, raw, key, allowed, id=f"{key}={value!r}")


@pytest.mark.parametrize(
    ("section", "raw", "key", "allowed"), [_bad_param(row) for row in BAD_VALUES]
)
def test_bad_value_names_the_key(
    section: str, raw: dict[str, Any], key: str, allowed: tuple[Any, ...] | None
) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params({section: raw})
    message = str(info.value)
    assert key in message
    if allowed is not None:
        for choice in allowed:
            assert repr(choice) in message, f"{choice!r} not listed in: {message}"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        pytest.param({"base": [1]}, "base", id="base-list"),
        pytest.param({"sample": 3}, "sample", id="sample-int"),
        pytest.param({"ingest": "data/sample"}, "ingest", id="ingest-string"),
        pytest.param({"stats": [{"eps": 1}]}, "stats", id="stats-list"),
    ],
)
def test_section_that_is_not_a_mapping(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ParamsError, match=key):
        parse_params(raw)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param([{"base": {}}], id="list"),
        pytest.param("base: auto", id="string"),
        pytest.param(3, id="int"),
    ],
)
def test_top_level_not_a_mapping(raw: object) -> None:
    with pytest.raises(ParamsError, match="mapping of sections"):
        parse_params(raw)


# --- unknown keys and sections ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        pytest.param({"base": {"worker": 2}}, ["'worker'", "'base'", "workers"], id="base-key"),
        pytest.param({"sample": {"sed": 1}}, ["'sed'", "'sample'"], id="sample-key"),
        pytest.param(
            {"ingest": {"sise": 1}}, ["'sise'", "'ingest'", "image_size"], id="ingest-key"
        ),
        pytest.param(
            {"ingest": {"a1": 1, "b2": 2}}, ["'a1'", "'b2'", "'ingest'"], id="ingest-two-keys"
        ),
        pytest.param(
            {"ingest": {"split": {"vla": 0.1}}}, ["'vla'", "'ingest.split'"], id="split-key"
        ),
        pytest.param({"stats": {"percentile": [1]}}, ["'percentile'", "'stats'"], id="stats-key"),
        pytest.param(
            {"ingest": {"size": [64, 64]}},
            ["ingest.size", "ingest.image_size"],
            id="renamed-ingest-size",
        ),
        pytest.param({"ingest": {"sise": 1, 224: 2}}, ["'sise'", "224"], id="str-and-int-keys"),
    ],
)
def test_unknown_names_are_errors_naming_them(raw: dict[Any, Any], names: list[str]) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    for name in names:
        assert name in str(info.value)


# --- cross-key rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "shard"),
    [
        pytest.param(16, 100, id="16-100"),
        pytest.param(3, None, id="3-default-256"),
        pytest.param(None, 250, id="default-16-250"),
        pytest.param(32, 16, id="shard-smaller-than-chunk"),
    ],
)
def test_shard_must_be_a_multiple_of_chunk(chunk: int | None, shard: int | None) -> None:
    raw = {k: v for k, v in (("chunk_images", chunk), ("shard_images", shard)) if v is not None}
    with pytest.raises(ParamsError) as info:
        parse_params({"ingest": raw})
    assert "ingest.shard_images" in str(info.value)
    assert "ingest.chunk_images" in str(info.value)


@pytest.mark.parametrize(
    ("chunk", "shard"),
    [
        pytest.param(16, 16, id="equal"),
        pytest.param(7, 21, id="7-21"),
        pytest.param(1, 5, id="1-5"),
    ],
)
def test_shard_multiple_of_chunk_is_fine(chunk: int, shard: int) -> None:
    p = parse_params({"ingest": {"chunk_images": chunk, "shard_images": shard}})
    assert (p.ingest.chunk_images, p.ingest.shard_images) == (chunk, shard)


@pytest.mark.parametrize(
    ("val", "test"),
    [
        pytest.param(0.5, 0.5, id="0.5+0.5"),
        pytest.param(0.7, 0.3, id="0.7+0.3"),
        pytest.param(0.9, 0.1, id="0.9+0.1"),
        pytest.param(0.6, 0.6, id="0.6+0.6"),
        pytest.param(0.99, 0.01, id="0.99+0.01"),
    ],
)
def test_val_plus_test_at_least_one_is_an_error(val: float, test: float) -> None:
    with pytest.raises(ParamsError, match=r"ingest\.split"):
        parse_params({"ingest": {"split": {"val": val, "test": test}}})


@pytest.mark.parametrize(
    ("val", "test"),
    [
        pytest.param(0.5, 0.49, id="0.5+0.49"),
        pytest.param(0, 0, id="0+0"),
        pytest.param(0.999, 0, id="0.999+0"),
    ],
)
def test_val_plus_test_below_one_is_fine(val: float, test: float) -> None:
    split = parse_params({"ingest": {"split": {"val": val, "test": test}}}).ingest.split
    assert (split.val, split.test) == (val, test)
    assert isinstance(split.val, float)
    assert isinstance(split.test, float)


# --- load_params -----------------------------------------------------------------------------

YAML_TEXT = """\
# a params file that changes a few values
base:
  scheduler: threads
  workers: 2
ingest:
  image_size: [64, 48]
  resize: pad
  pad_value: 7
  split:
    val: 0.2
stats:
  percentiles: [50, 5]
"""


def test_load_params_reads_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(YAML_TEXT, encoding="utf-8")
    p = load_params(path)
    assert p == parse_params(yaml.safe_load(YAML_TEXT))
    assert p.base == BaseParams(scheduler="threads", workers=2)
    assert p.ingest.image_size == (64, 48)
    assert p.ingest.pad_value == (7, 7, 7)
    assert p.ingest.split == SplitParams(val=0.2)
    assert p.stats.percentiles == (5.0, 50.0)
    assert p.sample == SampleParams()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("# nothing here\n", id="comment-only"),
        pytest.param("---\n", id="document-marker"),
    ],
)
def test_load_params_empty_file_gives_defaults(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_params(path) == Params()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("ingest: [unclosed\n", id="unclosed-list"),
        pytest.param("base:\n  scheduler: auto\n workers: 2\n", id="bad-indentation"),
        pytest.param("base:\n\tscheduler: auto\n", id="tab-indent"),
        pytest.param("a: b: c\n", id="nested-colon"),
        pytest.param('ingest: {source: "data\n', id="unterminated-string"),
        pytest.param("base: &a\n  x: *b\n", id="unknown-alias"),
    ],
)
def test_load_params_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "not valid YAML" in message
    assert str(path) in message
    assert isinstance(info.value.__cause__, yaml.YAMLError)


def test_load_params_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "params.yaml"
    with pytest.raises(ParamsError, match="Cannot read params file") as info:
        load_params(path)
    assert str(path) in str(info.value)
    assert "No such file" in str(info.value)


def test_load_params_directory(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="Cannot read params file"):
        load_params(tmp_path)


def test_load_params_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes("# r\u00e9sum\u00e9 of the settings\nbase: {}\n".encode("latin-1"))
    with pytest.raises(ParamsError, match=str(path)):
        load_params(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("- base\n- ingest\n", "mapping of sections", id="top-level-list"),
        pytest.param("ingest:\n  on_error: ignore\n", "ingest.on_error", id="bad-value"),
    ],
)
def test_load_params_bad_content_names_the_file_or_key(
    tmp_path: Path, text: str, match: str
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ParamsError, match=match):
        load_params(path)


def test_load_params_origin_is_named_for_file_level_errors(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- ingets\n", encoding="utf-8")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_load_params_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_params() == Params()  # no params.yaml here: all defaults
    (tmp_path / "params.yaml").write_text(YAML_TEXT, encoding="utf-8")
    assert load_params() == parse_params(yaml.safe_load(YAML_TEXT))


def test_params_error_family() -> None:
    assert issubclass(ParamsError, ValueError)
    assert issubclass(ParamsError, PipelineError)


# --- upper bounds: just inside is fine, just outside names the key, the value and the range ----

GIB2 = 2 * 2**30  # the stated per-buffer limit
RGB8_1024 = 1024 * 1024 * 3  # bytes of one 1024x1024 RGB uint8 image
GRAY16_1024 = 1024 * 1024 * 2
RGB8_224 = 224 * 224 * 3

# (id, section, inside, outside, key, words of the allowed range)
BOUNDS: list[Any] = [
    ("workers", "base", {"workers": 1024}, {"workers": 1025}, "base.workers", "1..1024"),
    ("seed", "sample", {"seed": 2**32 - 1}, {"seed": 2**32}, "sample.seed", "0..4294967295"),
    ("images_per_class", "sample", {"images_per_class": 10_000},
     {"images_per_class": 10_001}, "sample.images_per_class", "1..10000"),
    ("image_size-side", "ingest", {"image_size": [65536, 1]}, {"image_size": [1, 65537]},
     "ingest.image_size", "1..65536"),
    ("chunk_images-count", "ingest",
     {"image_size": None, "chunk_images": 2**20, "shard_images": 2**20},
     {"image_size": None, "chunk_images": 2**20 + 1, "shard_images": 2**20 + 1},
     "ingest.chunk_images", "1..1048576"),
    ("shard_images-count", "ingest",
     {"image_size": None, "chunk_images": 1, "shard_images": 2**20},
     {"image_size": None, "chunk_images": 1, "shard_images": 2**20 + 1},
     "ingest.shard_images", "1..1048576"),
    ("shard-rgb8-memory", "ingest",
     {"image_size": [1024, 1024], "chunk_images": 2, "shard_images": GIB2 // RGB8_1024},
     {"image_size": [1024, 1024], "chunk_images": 2, "shard_images": GIB2 // RGB8_1024 + 2},
     "ingest.shard_images", f"1..{GIB2 // RGB8_1024}"),
    ("shard-keep-is-3-channels", "ingest",
     {"image_size": [1024, 1024], "color": "keep", "chunk_images": 1, "shard_images": 682},
     {"image_size": [1024, 1024], "color": "keep", "chunk_images": 1, "shard_images": 683},
     "ingest.shard_images", "1..682"),
    ("chunk-gray16-memory", "ingest",
     {"image_size": [1024, 1024], "color": "gray", "bit_depth": 16, "chunk_images": 1024,
      "shard_images": 1024},
     {"image_size": [1024, 1024], "color": "gray", "bit_depth": 16, "chunk_images": 1025,
      "shard_images": 1025},
     "ingest.chunk_images", f"1..{GIB2 // GRAY16_1024}"),
    ("max_pixels", "ingest", {"max_pixels": 2**29}, {"max_pixels": 2**29 + 1},
     "ingest.max_pixels", "1..536870912"),
    ("ingest-zstd-high", "ingest", {"codec": "zstd", "codec_level": 22},
     {"codec": "zstd", "codec_level": 23}, "ingest.codec_level", "1..22"),
    ("ingest-zstd-low", "ingest", {"codec": "zstd", "codec_level": 1},
     {"codec": "zstd", "codec_level": 0}, "ingest.codec_level", "1..22"),
    ("ingest-lz4-high", "ingest", {"codec": "lz4", "codec_level": 9},
     {"codec": "lz4", "codec_level": 10}, "ingest.codec_level", "0..9"),
    ("ingest-lz4-low", "ingest", {"codec": "lz4", "codec_level": 0},
     {"codec": "lz4", "codec_level": -1}, "ingest.codec_level", "0..9"),
    ("ingest-none-level", "ingest", {"codec_level": 22}, {"codec_level": 23},
     "ingest.codec_level", "0..22"),
    ("normalize-zstd-high", "normalize", {"codec": "zstd", "codec_level": 22},
     {"codec": "zstd", "codec_level": 23}, "normalize.codec_level", "1..22"),
    ("normalize-zstd-low", "normalize", {"codec": "zstd", "codec_level": 1},
     {"codec": "zstd", "codec_level": 0}, "normalize.codec_level", "1..22"),
    ("normalize-lz4-high", "normalize", {"codec": "lz4", "codec_level": 9},
     {"codec": "lz4", "codec_level": 10}, "normalize.codec_level", "0..9"),
    ("normalize-lz4-low", "normalize", {"codec": "lz4", "codec_level": 0},
     {"codec": "lz4", "codec_level": -1}, "normalize.codec_level", "0..9"),
    ("block_images-count", "stats", {"block_images": 1}, {"block_images": 2**20 + 1},
     "stats.block_images", "1..1048576"),
    ("split_every", "stats", {"split_every": 1024}, {"split_every": 1025},
     "stats.split_every", "1024"),
    ("percentiles-count", "stats", {"percentiles": [50] * 1001},
     {"percentiles": [50] * 1002}, "stats.percentiles", "1001"),
    ("stats-eps-inf", "stats", {"eps": 5e-324}, {"eps": math.inf}, "stats.eps", "> 0"),
    ("stats-eps--inf", "stats", {"eps": 1e308}, {"eps": -math.inf}, "stats.eps", "> 0"),
    ("stats-eps-nan", "stats", {"eps": 1}, {"eps": math.nan}, "stats.eps", "finite"),
    ("normalize-eps-inf", "normalize", {"eps": 0}, {"eps": math.inf}, "normalize.eps", ">= 0"),
    ("normalize-eps-nan", "normalize", {"eps": 0.0}, {"eps": math.nan}, "normalize.eps",
     "finite"),
]


@pytest.mark.parametrize(
    ("section", "inside", "outside", "key", "allowed"),
    [pytest.param(*row[1:], id=row[0]) for row in BOUNDS],
)
def test_bound_just_inside_and_just_outside(
    section: str, inside: dict[str, Any], outside: dict[str, Any], key: str, allowed: str
) -> None:
    parsed = getattr(parse_params({section: inside}), section)
    for name, value in inside.items():
        got = getattr(parsed, name)
        assert got == (tuple(sorted(set(value))) if name == "percentiles" else
                       tuple(value) if isinstance(value, list) else value)
    with pytest.raises(ParamsError) as info:
        parse_params({section: outside})
    message = str(info.value)
    assert key in message
    assert allowed in message, message
    bad = outside[key.rsplit(".", 1)[1]]
    if not isinstance(bad, list):
        assert str(bad) in message or repr(bad) in message


@pytest.mark.parametrize(
    ("ingest", "block", "ok"),
    [
        pytest.param({}, GIB2 // RGB8_224, True, id="default-size-inside"),
        pytest.param({}, GIB2 // RGB8_224 + 1, False, id="default-size-outside"),
        pytest.param({"image_size": [1024, 1024], "color": "gray", "bit_depth": 16}, 1024, True,
                     id="gray16-inside"),
        pytest.param({"image_size": [1024, 1024], "color": "gray", "bit_depth": 16}, 1025, False,
                     id="gray16-outside"),
        pytest.param({"image_size": None}, 2**20, True, id="native-size-count-only"),
    ],
)
def test_stats_block_images_follows_the_shard_memory_rule(
    ingest: dict[str, Any], block: int, ok: bool
) -> None:
    raw = {"ingest": ingest, "stats": {"block_images": block}}
    if ok:
        assert parse_params(raw).stats.block_images == block
        return
    with pytest.raises(ParamsError, match=r"stats\.block_images is \d+") as info:
        parse_params(raw)
    assert "GiB" in str(info.value)


def test_an_image_too_large_for_any_shard_says_so() -> None:
    with pytest.raises(ParamsError, match=r"make ingest\.image_size smaller"):
        parse_params({"ingest": {"image_size": [65536, 65536], "chunk_images": 1,
                                 "shard_images": 1}})


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        pytest.param({"ingest": {"resize": "x" * 10_000_000}}, "ingest.resize", id="10MB-string"),
        pytest.param({"ingest": {"image_size": list(range(1_000_000))}}, "ingest.image_size",
                     id="huge-list"),
        pytest.param({"ingest": {"x" * 1_000_000: 1}}, "ingest", id="huge-unknown-key"),
        pytest.param({"base": "z" * 1_000_000}, "base", id="huge-section"),
    ],
)
def test_a_huge_bad_value_is_quoted_short(raw: dict[Any, Any], key: str) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    message = str(info.value)
    assert key in message
    assert "..." in message
    assert len(message) < 400, message


# --- load_params: duplicate keys, aliases, nesting and size --------------------------------------


def _load(tmp_path: Path, text: str) -> Params:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return load_params(path)


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        pytest.param("base: {}\nbase: {}\n", "'base'", 2, id="section"),
        pytest.param("ingest:\n  codec: zstd\n  bit_depth: 8\n  codec: lz4\n", "'codec'", 4,
                     id="key"),
        pytest.param("ingest:\n  split:\n    val: 0.1\n    val: 0.2\n", "'val'", 4,
                     id="nested-key"),
        pytest.param("ingest: {codec: zstd, codec: lz4}\n", "'codec'", 1, id="flow-mapping"),
        pytest.param("stats:\n  eps: 1\n  'eps': 2\n", "'eps'", 3, id="quoted-same-key"),
    ],
)
def test_duplicate_key_is_an_error_naming_key_and_line(
    tmp_path: Path, text: str, key: str, line: int
) -> None:
    assert yaml.safe_load(text)  # plain YAML would keep the last value silently
    with pytest.raises(ParamsError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert f"Duplicate key {key}" in message
    assert f"line {line}" in message
    assert str(tmp_path / "params.yaml") in message


def test_merge_key_override_is_not_a_duplicate(tmp_path: Path) -> None:
    text = "ingest:\n  split:\n    <<: {method: hash, val: 0.2, test: 0.2}\n    val: 0.3\n"
    assert yaml.safe_load(text)["ingest"]["split"]["val"] == 0.3
    assert _load(tmp_path, text).ingest.split == SplitParams(method="hash", val=0.3, test=0.2)


def test_small_aliases_keep_safe_load_semantics(tmp_path: Path) -> None:
    text = "ingest:\n  pad_value: &grey [9, 9, 9]\n  background: *grey\n"
    p = _load(tmp_path, text)
    assert p == parse_params(yaml.safe_load(text))
    assert p.ingest.background == (9, 9, 9)


def _bomb(levels: int) -> str:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [5, 9, 30], ids=["1e5", "1e9", "1e30"])
def test_alias_bomb_is_refused_cheaply(tmp_path: Path, levels: int) -> None:
    with pytest.raises(ParamsError, match="expands to more than 100000 YAML values"):
        _load(tmp_path, _bomb(levels))


def test_alias_within_the_node_bound_is_read(tmp_path: Path) -> None:
    # 4 levels: 10**4 leaves, 11111 sequence nodes and leaves in all: under the bound
    assert _load(tmp_path, _bomb(4)) == Params()  # read, and its sections are not ours


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="nested more than 32"):
        _load(tmp_path, "x: &r [*r]\n")


@pytest.mark.parametrize(
    ("depth", "match"),
    [
        pytest.param(31, "Expected a mapping", id="31-inside"),
        pytest.param(32, "nested more than 32 levels", id="32-outside"),
        pytest.param(100_000, "nested", id="100000"),
    ],
)
def test_nesting_is_bounded(tmp_path: Path, depth: int, match: str) -> None:
    # the root mapping is level 1, the outermost list level 2, the innermost level depth + 1
    with pytest.raises(ParamsError, match=match):
        _load(tmp_path, "ingest: " + "[" * depth + "]" * depth + "\n")


def test_params_file_size_is_bounded(tmp_path: Path) -> None:
    head = "base: {workers: 2}\n# "
    inside = head + "x" * (2**20 - len(head) - 1) + "\n"
    assert len(inside.encode()) == 2**20
    assert _load(tmp_path, inside).base.workers == 2
    with pytest.raises(ParamsError, match="larger than 1 MiB"):
        _load(tmp_path, inside + "\n")


def test_invalid_yaml_message_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ParamsError) as info:
        _load(tmp_path, "base:\n  scheduler: [auto\n")
    assert "\n" not in str(info.value)
    assert "line 3" in str(info.value)


# --- sharing params.yaml with other stages: only our sections are read ---------------------------


def test_other_sections_are_ignored() -> None:
    raw = {"train": {"lr": 0.1, "epochs": 3}, "ingets": {"x": 1}, 2: [1], "normalize": {}}
    assert parse_params(raw) == Params()


def test_a_typo_inside_our_section_is_still_an_error() -> None:
    with pytest.raises(ParamsError, match=r"'sise'.*'ingest'"):
        parse_params({"train": {"lr": 0.1}, "ingest": {"sise": 1}})


def test_prefixed_sections_are_read_and_unprefixed_ones_ignored() -> None:
    raw = {
        "base": {"seed": 42},  # someone else's base (DVC's example projects have one)
        "imgnorm_normalize": {"mode": "per_pixel"},
        "imgnorm_base": {"workers": 2},
    }
    p = parse_params(raw, prefix="imgnorm_")
    assert p.normalize.mode == "per_pixel"
    assert p.base.workers == 2
    assert p.ingest == Params().ingest


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        pytest.param({"imgnorm_ingets": {}}, ["'imgnorm_ingets'", "imgnorm_ingest"], id="section"),
        pytest.param(
            {"imgnorm_ingest": {"sise": 1}}, ["'sise'", "'imgnorm_ingest'"], id="key"
        ),
        pytest.param(
            {"imgnorm_ingest": {"split": {"vla": 1}}}, ["'vla'", "'imgnorm_ingest.split'"],
            id="nested-key",
        ),
        pytest.param(
            {"imgnorm_normalize": {"mode": "x"}}, ["imgnorm_normalize.mode"], id="value"
        ),
        pytest.param(
            {"imgnorm_stats": {"fit_split": "val"}},
            ["imgnorm_stats.fit_split", "imgnorm_stats.allow_non_train_fit", "stats.json"],
            id="cross-key",
        ),
        pytest.param({"imgnorm_base": 3}, ["imgnorm_base"], id="not-a-mapping"),
    ],
)
def test_prefixed_errors_name_the_key_as_written(raw: dict[str, Any], names: list[str]) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(raw, prefix="imgnorm_")
    message = str(info.value)
    for name in names:
        assert name in message, message
    assert "imgnorm_stats.json" not in message


@pytest.mark.parametrize("prefix", ["1x", "a-b", "a.b", "a b", "x" * 33])
def test_a_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ParamsError, match="--params-prefix"):
        parse_params({}, prefix=prefix)


def test_load_params_with_prefix(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.1\nimgnorm_ingest:\n  bit_depth: 16\n", encoding="utf-8")
    assert load_params(path, prefix="imgnorm_").ingest.bit_depth == 16
    assert load_params(path) == Params()
