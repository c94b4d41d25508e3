"""params.yaml: one frozen dataclass per section, every value parsed at the boundary.

Every key has a default, so a params file may give only what it changes. Unknown sections and
keys are errors: a typo must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ParamsError

__all__ = [
    "DEFAULT_PARAMS_FILE",
    "BaseParams",
    "IngestParams",
    "NormalizeParams",
    "Params",
    "SampleParams",
    "SplitParams",
    "StatsParams",
    "load_params",
    "parse_params",
    "parse_scheduler",
]

DEFAULT_PARAMS_FILE = Path("params.yaml")

SCHEDULERS = ("auto", "threads", "processes", "synchronous")
RESIZE_POLICIES = ("shorter_side_center_crop", "stretch", "pad")
RESAMPLE_FILTERS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
COLORS = ("rgb", "gray", "keep")
ALPHA_POLICIES = ("drop", "composite")
BIT_DEPTHS = (8, 16)
SPLIT_METHODS = ("hash", "folders")
ON_ERROR = ("fail", "skip")
DUPLICATES = ("keep", "drop")
CODECS = ("none", "zstd", "lz4")
# Pillow's default Image.MAX_IMAGE_PIXELS, copied so params do not depend on Pillow's state.
PILLOW_MAX_PIXELS = 89_478_485


# --- parse_* helpers: each returns a normalized value or raises ParamsError naming the key ---


def _fail(key: str, expected: str, value: object) -> ParamsError:
    return ParamsError(f"Expected {expected} for {key}. Got {value!r} instead.")


def parse_choice(value: object, key: str, choices: Sequence[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``."""
    if isinstance(value, bool) or not any(
        type(value) is type(choice) and value == choice for choice in choices
    ):
        allowed = ", ".join(repr(c) for c in choices)
        raise _fail(key, f"one of {allowed}", value)
    return value


def parse_scheduler(value: object, key: str) -> str:
    """A local scheduler name, or the tcp:// or tls:// address of a dask.distributed scheduler."""
    if isinstance(value, str) and (value in SCHEDULERS or value.startswith(("tcp://", "tls://"))):
        return value
    allowed = ", ".join(repr(c) for c in SCHEDULERS)
    raise _fail(key, f"one of {allowed}, or a scheduler address like 'tcp://host:8786'", value)


def parse_int(value: object, key: str, *, minimum: int | None = None) -> int:
    """Return ``value`` as an int no smaller than ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, "an integer", value)
    if minimum is not None and value < minimum:
        raise _fail(key, f"an integer >= {minimum}", value)
    return value


def parse_fraction(value: object, key: str) -> float:
    """Return ``value`` as a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise _fail(key, "a number in [0, 1)", value)
    return float(value)


def parse_size(value: object, key: str) -> tuple[int, int] | None:
    """Return ``[H, W]`` as a tuple of positive ints, or None (keep native size)."""
    if value is None:
        return None
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise _fail(key, "[height, width] as two positive integers, or null", value)
    return (int(value[0]), int(value[1]))


def parse_color(value: object, key: str) -> tuple[int, int, int]:
    """Return an RGB colour from an int (gray) or a list of three ints, each in 0..255."""
    items = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(items, Sequence)
        or isinstance(items, str)
        or len(items) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in items)
    ):
        raise _fail(key, "a gray level 0..255 or [r, g, b] with each in 0..255", value)
    return (int(items[0]), int(items[1]), int(items[2]))


# Keys named "size" or "nfiles" are invisible to DVC's run-cache key (treeverse/dvc#10296):
# changing such a param would silently restore the outputs of the old value. So none is used.
RENAMED = {"ingest.size": "ingest.image_size"}


def _check_keys(section: str, given: Mapping[str, Any], cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known, key=repr)
    for key in unknown:
        if f"{section}.{key}" in RENAMED:
            raise ParamsError(
                f"{section}.{key} is called {RENAMED[f'{section}.{key}']} here: DVC's run-cache "
                f"ignores params named {key!r} (treeverse/dvc#10296). Rename the key."
            )
    if unknown:
        raise ParamsError(
            f"Unknown key(s) {', '.join(repr(k) for k in unknown)} in params section "
            f"{section!r}. Allowed keys: {', '.join(sorted(known))}."
        )


def _section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(name, "a mapping of keys to values", value)
    return value


# --- sections ---


@dataclass(frozen=True, kw_only=True)
class BaseParams:
    """Section ``base``: settings shared by every stage."""

    scheduler: str = "auto"
    workers: int | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> BaseParams:
        _check_keys("base", raw, cls)
        workers = raw.get("workers")
        return cls(
            scheduler=parse_scheduler(raw.get("scheduler", "auto"), "base.scheduler"),
            workers=None if workers is None else parse_int(workers, "base.workers", minimum=1),
        )


@dataclass(frozen=True, kw_only=True)
class SampleParams:
    """Section ``sample``: the embedded sample dataset."""

    seed: int = 0
    images_per_class: int = 50

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SampleParams:
        _check_keys("sample", raw, cls)
        return cls(
            seed=parse_int(raw.get("seed", 0), "sample.seed", minimum=0),
            images_per_class=parse_int(
                raw.get("images_per_class", 50), "sample.images_per_class", minimum=1
            ),
        )


@dataclass(frozen=True, kw_only=True)
class SplitParams:
    """``ingest.split``: by a hash of the relative path, or by top-level folders."""

    method: str = "hash"
    val: float = 0.1
    test: float = 0.1

    @classmethod
    def from_dict(cls, raw: object) -> SplitParams:
        if not isinstance(raw, Mapping):
            raise _fail(
                "ingest.split", "a mapping such as {method: hash, val: 0.1, test: 0.1}", raw
            )
        _check_keys("ingest.split", raw, cls)
        method = parse_choice(raw.get("method", "hash"), "ingest.split.method", SPLIT_METHODS)
        val = parse_fraction(raw.get("val", 0.1), "ingest.split.val")
        test = parse_fraction(raw.get("test", 0.1), "ingest.split.test")
        if val + test >= 1:
            raise _fail("ingest.split", "val + test < 1 (something must be left to train on)", raw)
        return cls(method=method, val=val, test=test)


@dataclass(frozen=True, kw_only=True)
class IngestParams:
    """Section ``ingest``: how an image folder becomes the prepared uint8/uint16 store."""

    source: str = "data/sample"
    image_size: tuple[int, int] | None = (224, 224)
    resize: str = "shorter_side_center_crop"
    resample: str = "bilinear"
    pad_value: tuple[int, int, int] = (0, 0, 0)
    color: str = "rgb"
    alpha: str = "composite"
    background: tuple[int, int, int] = (255, 255, 255)
    bit_depth: int = 8
    split: SplitParams = field(default_factory=SplitParams)
    on_error: str = "fail"
    duplicates: str = "keep"
    max_pixels: int = PILLOW_MAX_PIXELS
    max_file_bytes: int = 1 << 30
    chunk_images: int = 16
    shard_images: int = 256
    codec: str = "none"
    codec_level: int = 1

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> IngestParams:
        _check_keys("ingest", raw, cls)
        d = cls()
        source = raw.get("source", d.source)
        if not isinstance(source, str) or not source:
            raise _fail("ingest.source", "a folder path", source)
        chunk = parse_int(raw.get("chunk_images", d.chunk_images), "ingest.chunk_images", minimum=1)
        shard = parse_int(raw.get("shard_images", d.shard_images), "ingest.shard_images", minimum=1)
        if shard % chunk:
            raise _fail(
                "ingest.shard_images", f"a multiple of ingest.chunk_images ({chunk})", shard
            )
        return cls(
            source=source,
            image_size=parse_size(raw.get("image_size", d.image_size), "ingest.image_size"),
            resize=parse_choice(raw.get("resize", d.resize), "ingest.resize", RESIZE_POLICIES),
            resample=parse_choice(
                raw.get("resample", d.resample), "ingest.resample", RESAMPLE_FILTERS
            ),
            pad_value=parse_color(raw.get("pad_value", d.pad_value), "ingest.pad_value"),
            color=parse_choice(raw.get("color", d.color), "ingest.color", COLORS),
            alpha=parse_choice(raw.get("alpha", d.alpha), "ingest.alpha", ALPHA_POLICIES),
            background=parse_color(raw.get("background", d.background), "ingest.background"),
            bit_depth=parse_choice(
                raw.get("bit_depth", d.bit_depth), "ingest.bit_depth", BIT_DEPTHS
            ),
            split=SplitParams.from_dict(raw.get("split", {})),
            on_error=parse_choice(raw.get("on_error", d.on_error), "ingest.on_error", ON_ERROR),
            duplicates=parse_choice(
                raw.get("duplicates", d.duplicates), "ingest.duplicates", DUPLICATES
            ),
            max_pixels=parse_int(
                raw.get("max_pixels", d.max_pixels), "ingest.max_pixels", minimum=1
            ),
            max_file_bytes=parse_int(
                raw.get("max_file_bytes", d.max_file_bytes), "ingest.max_file_bytes", minimum=1
            ),
            chunk_images=chunk,
            shard_images=shard,
            codec=parse_choice(raw.get("codec", d.codec), "ingest.codec", CODECS),
            codec_level=parse_int(raw.get("codec_level", d.codec_level), "ingest.codec_level"),
        )

    def decode_dict(self) -> dict[str, Any]:
        """The values that change decoded pixels (not storage layout): recorded as lineage."""
        d = dataclasses.asdict(self)
        layout = ("source", "chunk_images", "shard_images", "codec", "codec_level")
        for key in (*layout, "on_error", "duplicates", "max_file_bytes"):
            d.pop(key)
        return _jsonable(d)


FIT_SPLITS = ("train", "val", "test", "all")
ZERO_STD = ("one", "eps")


def parse_percentiles(value: object, key: str) -> tuple[float, ...]:
    """Return a sorted tuple of distinct percentiles, each in [0, 100]."""
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 100 for v in value
        )
    ):
        raise _fail(key, "a list of numbers in [0, 100]", value)
    return tuple(sorted({float(v) for v in value}))


@dataclass(frozen=True, kw_only=True)
class StatsParams:
    """Section ``stats``: which split the statistics are fitted on, and how."""

    fit_split: str = "train"
    allow_non_train_fit: bool = False
    zero_std: str = "one"
    eps: float = 1e-6
    percentiles: tuple[float, ...] = (1.0, 5.0, 50.0, 95.0, 99.0)
    block_images: int | None = None
    split_every: int = 8

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StatsParams:
        _check_keys("stats", raw, cls)
        d = cls()
        fit = parse_choice(raw.get("fit_split", d.fit_split), "stats.fit_split", FIT_SPLITS)
        allow = raw.get("allow_non_train_fit", d.allow_non_train_fit)
        if not isinstance(allow, bool):
            raise _fail("stats.allow_non_train_fit", "true or false", allow)
        if fit != "train" and not allow:
            raise ParamsError(
                f"stats.fit_split is {fit!r}: statistics fitted on data other than the training "
                f"split leak evaluation data into training. If that is really intended, set "
                f"stats.allow_non_train_fit: true (it is recorded in stats.json)."
            )
        eps = raw.get("eps", d.eps)
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
            raise _fail("stats.eps", "a number > 0", eps)
        block = raw.get("block_images", d.block_images)
        return cls(
            fit_split=fit,
            allow_non_train_fit=allow,
            zero_std=parse_choice(raw.get("zero_std", d.zero_std), "stats.zero_std", ZERO_STD),
            eps=float(eps),
            percentiles=parse_percentiles(
                raw.get("percentiles", d.percentiles), "stats.percentiles"
            ),
            block_images=None
            if block is None
            else parse_int(block, "stats.block_images", minimum=1),
            split_every=parse_int(
                raw.get("split_every", d.split_every), "stats.split_every", minimum=2
            ),
        )


NORMALIZE_MODES = (
    "per_channel",
    "per_pixel",
    "global",
    "per_image",
    "per_image_per_channel",
    "mean_only",
    "min_max",
)
DTYPES = ("float32", "float16")
INPUT_SCALES = ("pixel", "unit")


@dataclass(frozen=True, kw_only=True)
class NormalizeParams:
    """Section ``normalize``: how the fitted statistics are applied."""

    mode: str = "per_channel"
    eps: float = 1e-6
    dtype: str = "float32"
    input_scale: str = "pixel"
    codec: str = "none"
    codec_level: int = 1
    record_git_revision: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NormalizeParams:
        _check_keys("normalize", raw, cls)
        d = cls()
        eps = raw.get("eps", d.eps)
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
            raise _fail("normalize.eps", "a number >= 0", eps)
        record = raw.get("record_git_revision", d.record_git_revision)
        if not isinstance(record, bool):
            raise _fail("normalize.record_git_revision", "true or false", record)
        return cls(
            mode=parse_choice(raw.get("mode", d.mode), "normalize.mode", NORMALIZE_MODES),
            eps=float(eps),
            dtype=parse_choice(raw.get("dtype", d.dtype), "normalize.dtype", DTYPES),
            input_scale=parse_choice(
                raw.get("input_scale", d.input_scale), "normalize.input_scale", INPUT_SCALES
            ),
            codec=parse_choice(raw.get("codec", d.codec), "normalize.codec", CODECS),
            codec_level=parse_int(raw.get("codec_level", d.codec_level), "normalize.codec_level"),
            record_git_revision=record,
        )


@dataclass(frozen=True, kw_only=True)
class Params:
    """All sections of params.yaml."""

    base: BaseParams = field(default_factory=BaseParams)
    sample: SampleParams = field(default_factory=SampleParams)
    ingest: IngestParams = field(default_factory=IngestParams)
    stats: StatsParams = field(default_factory=StatsParams)
    normalize: NormalizeParams = field(default_factory=NormalizeParams)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, tuples as lists."""
        return _jsonable(dataclasses.asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


SECTIONS = {
    "base": BaseParams,
    "sample": SampleParams,
    "ingest": IngestParams,
    "stats": StatsParams,
    "normalize": NormalizeParams,
}


def parse_params(raw: object, *, origin: str = "params") -> Params:
    """Parse the mapping read from a params file."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"Expected a mapping of sections in {origin}. Got {raw!r} instead.")
    unknown = sorted(set(raw) - set(SECTIONS), key=repr)
    if unknown:
        raise ParamsError(
            f"Unknown section(s) {', '.join(repr(k) for k in unknown)} in {origin}. "
            f"Allowed sections: {', '.join(sorted(SECTIONS))}."
        )
    return Params(
        base=BaseParams.from_dict(_section(raw, "base")),
        sample=SampleParams.from_dict(_section(raw, "sample")),
        ingest=IngestParams.from_dict(_section(raw, "ingest")),
        stats=StatsParams.from_dict(_section(raw, "stats")),
        normalize=NormalizeParams.from_dict(_section(raw, "normalize")),
    )


def load_params(path: Path | None = None) -> Params:
    """Read ``path``, or ``params.yaml`` in the working directory (defaults when it is absent)."""
    if path is None:
        if not DEFAULT_PARAMS_FILE.exists():
            return Params()
        path = DEFAULT_PARAMS_FILE
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError(f"Cannot read params file {path}: {exc.strerror}.") from exc
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path} is not UTF-8 text: {exc}. Save it as UTF-8.") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    return parse_params(raw, origin=str(path))
