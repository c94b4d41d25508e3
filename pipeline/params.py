"""params.yaml: one frozen dataclass per section, every value parsed at the boundary.

Every key has a default, so a params file may give only what it changes. The tool reads only
its own sections (``SECTIONS``, each name optionally behind a prefix chosen at ``pipeline init``)
and ignores every other one, which belongs to the user's other stages; inside its own sections
unknown keys are errors: a typo must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ParamsError

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
    "parse_prefix",
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

# --- upper bounds: every value is bounded by the work or memory it implies ---
# One shard (and so one chunk) is decoded into a single in-memory buffer per Dask task, and
# stats reads one block the same way. With two such tasks per core on a small machine, 2 GiB
# per buffer is the most that still fits; the default 256 x 224 x 224 x 3 shard is 37 MiB.
MAX_BUFFER_BYTES = 2 * 2**30
MAX_IMAGES_PER_TASK = 2**20  # chunk, shard and block counts; the only bound with image_size null
MAX_SIDE = 2**16  # image_size sides: Pillow and PNG sizes fit in 16 bits in practice
# A decoded input holds at most 4 bytes per pixel (RGBA or 32-bit gray) before conversion.
MAX_PIXELS = MAX_BUFFER_BYTES // 4
MAX_IMAGES_PER_CLASS = 10_000  # the sample collection: a few MB per 50 images per class
MAX_SEED = 2**32 - 1  # numpy's legacy seeds and many tools take 32-bit seeds
MAX_WORKERS = 1024
MAX_SPLIT_EVERY = 1024
MAX_PERCENTILES = 1001  # every 0.1 from 0 to 100
# The compression levels each codec accepts: zarr's ZstdCodec refuses levels above 22 (zstd's
# maximum; 0 means "the default, 3", negatives are zstd's fast modes, not offered here), and
# BloscCodec refuses clevel outside 0..9. With codec none the level is unused, but still bounded.
CODEC_LEVELS = {"zstd": (1, 22), "lz4": (0, 9), "none": (0, 22)}
# What the message quotes of a bad value: a 10 MB string must not flood the terminal.
QUOTE_CHARS = 60


# --- parse_* helpers: each returns a normalized value or raises ParamsError naming the key ---


def quote(value: object) -> str:
    """``repr(value)``, cut to QUOTE_CHARS characters plus "..." when longer."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


def _fail(key: str, expected: str, value: object) -> ParamsError:
    return ParamsError(f"Expected {expected} for {key}. Got {quote(value)} instead.")


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


def parse_int(value: object, key: str, *, minimum: int, maximum: int) -> int:
    """Return ``value`` as an int in ``minimum..maximum``."""
    expected = f"an integer in {minimum}..{maximum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, expected, value)
    if not minimum <= value <= maximum:
        raise _fail(key, expected, value)
    return value


def parse_number(value: object, key: str, *, positive: bool) -> float:
    """Return ``value`` as a finite float, > 0 when ``positive``, else >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not (value > 0 if positive else value >= 0)
    ):
        raise _fail(key, f"a finite number {'> 0' if positive else '>= 0'}", value)
    return float(value)


def parse_codec_level(value: object, key: str, codec: str) -> int:
    """Return ``value`` as a compression level that ``codec`` accepts."""
    low, high = CODEC_LEVELS[codec]
    expected = f"an integer in {low}..{high} (codec {codec})"
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(key, expected, value)
    return value


def check_buffer(
    key: str, images: int, size: tuple[int, int] | None, color: str, bit_depth: int
) -> None:
    """Refuse ``images`` per task whose uint8/uint16 buffer would exceed MAX_BUFFER_BYTES."""
    if size is None:
        return  # native sizes: unknown until decode, only the count bound applies
    channels = 1 if color == "gray" else 3
    per_image = size[0] * size[1] * channels * (1 if bit_depth == 8 else 2)
    if images * per_image > MAX_BUFFER_BYTES:
        most = MAX_BUFFER_BYTES // per_image
        allowed = f"1..{most}" if most else "none: make ingest.image_size smaller"
        raise ParamsError(
            f"{key} is {images}: with ingest.image_size {size[0]}x{size[1]}, {channels} "
            f"channel(s) of {bit_depth} bits that is a {images * per_image / 2**30:.1f} GiB "
            f"buffer per task, over the {MAX_BUFFER_BYTES // 2**30} GiB limit. "
            f"Allowed: {allowed}."
        )


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
        or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIDE for v in value
        )
    ):
        raise _fail(key, f"[height, width] as two integers in 1..{MAX_SIDE}, or null", value)
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
            f"Unknown key(s) {', '.join(quote(k) for k in unknown[:5])} in params section "
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
            workers=None
            if workers is None
            else parse_int(workers, "base.workers", minimum=1, maximum=MAX_WORKERS),
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
            seed=parse_int(raw.get("seed", 0), "sample.seed", minimum=0, maximum=MAX_SEED),
            images_per_class=parse_int(
                raw.get("images_per_class", 50),
                "sample.images_per_class",
                minimum=1,
                maximum=MAX_IMAGES_PER_CLASS,
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
        n = MAX_IMAGES_PER_TASK
        chunk = parse_int(
            raw.get("chunk_images", d.chunk_images), "ingest.chunk_images", minimum=1, maximum=n
        )
        shard = parse_int(
            raw.get("shard_images", d.shard_images), "ingest.shard_images", minimum=1, maximum=n
        )
        if shard % chunk:
            raise _fail(
                "ingest.shard_images", f"a multiple of ingest.chunk_images ({chunk})", shard
            )
        size = parse_size(raw.get("image_size", d.image_size), "ingest.image_size")
        color = parse_choice(raw.get("color", d.color), "ingest.color", COLORS)
        bits = parse_choice(raw.get("bit_depth", d.bit_depth), "ingest.bit_depth", BIT_DEPTHS)
        check_buffer("ingest.chunk_images", chunk, size, color, bits)
        check_buffer("ingest.shard_images", shard, size, color, bits)
        codec = parse_choice(raw.get("codec", d.codec), "ingest.codec", CODECS)
        return cls(
            source=source,
            image_size=size,
            resize=parse_choice(raw.get("resize", d.resize), "ingest.resize", RESIZE_POLICIES),
            resample=parse_choice(
                raw.get("resample", d.resample), "ingest.resample", RESAMPLE_FILTERS
            ),
            pad_value=parse_color(raw.get("pad_value", d.pad_value), "ingest.pad_value"),
            color=color,
            alpha=parse_choice(raw.get("alpha", d.alpha), "ingest.alpha", ALPHA_POLICIES),
            background=parse_color(raw.get("background", d.background), "ingest.background"),
            bit_depth=bits,
            split=SplitParams.from_dict(raw.get("split", {})),
            on_error=parse_choice(raw.get("on_error", d.on_error), "ingest.on_error", ON_ERROR),
            duplicates=parse_choice(
                raw.get("duplicates", d.duplicates), "ingest.duplicates", DUPLICATES
            ),
            max_pixels=parse_int(
                raw.get("max_pixels", d.max_pixels),
                "ingest.max_pixels",
                minimum=1,
                maximum=MAX_PIXELS,
            ),
            max_file_bytes=parse_int(
                raw.get("max_file_bytes", d.max_file_bytes),
                "ingest.max_file_bytes",
                minimum=1,
                maximum=2**40,  # 1 TiB: a sanity bound, files are never read whole beyond this
            ),
            chunk_images=chunk,
            shard_images=shard,
            codec=codec,
            codec_level=parse_codec_level(
                raw.get("codec_level", d.codec_level), "ingest.codec_level", codec
            ),
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
    """Return a sorted tuple of distinct percentiles, each in [0, 100], at most MAX_PERCENTILES."""
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) > MAX_PERCENTILES
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 100 for v in value
        )
    ):
        raise _fail(key, f"a list of at most {MAX_PERCENTILES} numbers in [0, 100]", value)
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
        eps = parse_number(raw.get("eps", d.eps), "stats.eps", positive=True)
        block = raw.get("block_images", d.block_images)
        return cls(
            fit_split=fit,
            allow_non_train_fit=allow,
            zero_std=parse_choice(raw.get("zero_std", d.zero_std), "stats.zero_std", ZERO_STD),
            eps=eps,
            percentiles=parse_percentiles(
                raw.get("percentiles", d.percentiles), "stats.percentiles"
            ),
            block_images=None
            if block is None
            else parse_int(
                block, "stats.block_images", minimum=1, maximum=MAX_IMAGES_PER_TASK
            ),
            split_every=parse_int(
                raw.get("split_every", d.split_every),
                "stats.split_every",
                minimum=2,
                maximum=MAX_SPLIT_EVERY,
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
NORMALIZED_STORES = ("float", "lineage")
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
    store: str = "float"  # float: write the normalized images; lineage: attributes only

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NormalizeParams:
        _check_keys("normalize", raw, cls)
        d = cls()
        eps = parse_number(raw.get("eps", d.eps), "normalize.eps", positive=False)
        codec = parse_choice(raw.get("codec", d.codec), "normalize.codec", CODECS)
        record = raw.get("record_git_revision", d.record_git_revision)
        if not isinstance(record, bool):
            raise _fail("normalize.record_git_revision", "true or false", record)
        return cls(
            mode=parse_choice(raw.get("mode", d.mode), "normalize.mode", NORMALIZE_MODES),
            eps=eps,
            dtype=parse_choice(raw.get("dtype", d.dtype), "normalize.dtype", DTYPES),
            input_scale=parse_choice(
                raw.get("input_scale", d.input_scale), "normalize.input_scale", INPUT_SCALES
            ),
            codec=codec,
            codec_level=parse_codec_level(
                raw.get("codec_level", d.codec_level), "normalize.codec_level", codec
            ),
            record_git_revision=record,
            store=parse_choice(raw.get("store", d.store), "normalize.store", NORMALIZED_STORES),
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


# A prefix is the start of a YAML key and of a DVC `-S` path: letters, digits and "_" only.
PREFIX_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")


def parse_prefix(value: str, option: str = "--params-prefix") -> str:
    """Return ``value`` if it is "" or a valid section-name prefix (``imgnorm_``)."""
    if value and not PREFIX_PATTERN.fullmatch(value):
        raise ParamsError(
            f"{option} is {quote(value)}; allowed: a letter, then up to 31 letters, digits or "
            f"'_' (for example 'imgnorm_')."
        )
    return value


def _with_prefix(message: str, prefix: str) -> str:
    """``message`` with our section names as the params file spells them (``P<name>``)."""
    names = "|".join(SECTIONS)
    classes = (*SECTIONS.values(), SplitParams)
    keys = "|".join(sorted({f.name for cls in classes for f in dataclasses.fields(cls)}))
    message = re.sub(rf"\b({names})\.({keys})\b", rf"{prefix}\1.\2", message)
    message = re.sub(rf"\bfor ({names})\.", rf"for {prefix}\1.", message)
    return re.sub(rf"section '({names})([.'])", rf"section '{prefix}\1\2", message)


def parse_params(raw: object, *, origin: str = "params", prefix: str = "") -> Params:
    """Parse the mapping read from a params file: its sections ``prefix + name`` for each of
    ours; every other section is someone else's and is ignored. With a prefix, a section that
    starts with it but is none of ours is a typo, and an error."""
    prefix = parse_prefix(prefix)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(
            f"Expected a mapping of sections in {origin}. Got {quote(raw)} instead."
        )
    ours = {prefix + name for name in SECTIONS}
    mistyped = [k for k in raw if isinstance(k, str) and k.startswith(prefix) and k not in ours]
    unknown = sorted(mistyped, key=repr) if prefix else []
    if unknown:
        raise ParamsError(
            f"Unknown section(s) {', '.join(quote(k) for k in unknown[:5])} in {origin}: "
            f"sections starting with {prefix!r} are this tool's. "
            f"Allowed: {', '.join(sorted(ours))}."
        )
    mine = {name: raw.get(prefix + name) for name in SECTIONS}
    try:
        return _parse_sections(mine)
    except ParamsError as exc:
        if not prefix:
            raise
        raise ParamsError(_with_prefix(str(exc), prefix)) from exc


def _parse_sections(raw: Mapping[str, Any]) -> Params:
    params = Params(
        base=BaseParams.from_dict(_section(raw, "base")),
        sample=SampleParams.from_dict(_section(raw, "sample")),
        ingest=IngestParams.from_dict(_section(raw, "ingest")),
        stats=StatsParams.from_dict(_section(raw, "stats")),
        normalize=NormalizeParams.from_dict(_section(raw, "normalize")),
    )
    i, block = params.ingest, params.stats.block_images
    if block is not None:  # a stats block is read into one buffer, like a shard
        check_buffer("stats.block_images", block, i.image_size, i.color, i.bit_depth)
    return params


# A params file is a few KB; these bounds refuse hostile or broken files before any work.
MAX_PARAMS_BYTES = 2**20
MAX_YAML_NODES = 100_000  # counted with aliases expanded: "billion laughs" stops here
MAX_YAML_DEPTH = 32  # the deepest real key, ingest.split.val, is at depth 3


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys at any level, naming the key and its line."""

    origin = "params"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` then overriding a key is not a duplicate
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise ParamsError(
                    f"Duplicate key {quote(key)} in {self.origin} on line "
                    f"{key_node.start_mark.line + 1}: each key may appear once per mapping. "
                    f"Remove one of them."
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_size(root: yaml.Node, origin: str) -> None:
    """Count nodes with aliases expanded and bound the depth, without building any object."""
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise ParamsError(
                f"{origin} expands to more than {MAX_YAML_NODES} YAML values (aliases counted "
                f"each time they are used). Write the values out instead of nesting aliases."
            )
        if depth > MAX_YAML_DEPTH:
            raise ParamsError(
                f"{origin} is nested more than {MAX_YAML_DEPTH} levels deep (line "
                f"{node.start_mark.line + 1}). Params are at most three levels deep."
            )
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend(((key, depth + 1), (value, depth + 1)))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: its problem and where."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return f"{exc.problem or exc.context}{where}"
    return " ".join(str(exc).split())


def parse_yaml(text: str, origin: str) -> Any:
    """``yaml.safe_load(text)``, refusing duplicate keys, alias bombs and deep nesting."""
    loader = _Loader(text)
    loader.origin = origin
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, origin)
        return loader.construct_document(node)
    except RecursionError as exc:  # the composer recurses once per nesting level
        raise ParamsError(
            f"{origin} is nested too deeply to read. Params are at most three levels deep."
        ) from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{origin} is not valid YAML: {_yaml_problem(exc)}.") from exc
    finally:
        loader.dispose()


def load_params(path: Path | None = None, *, prefix: str = "") -> Params:
    """Read ``path``, or ``params.yaml`` in the working directory (defaults when it is absent);
    our sections are ``prefix + name``."""
    if path is None:
        if not DEFAULT_PARAMS_FILE.exists():
            return Params()
        path = DEFAULT_PARAMS_FILE
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_PARAMS_BYTES + 1)
    except OSError as exc:
        raise ParamsError(f"Cannot read params file {path}: {exc.strerror}.") from exc
    if len(data) > MAX_PARAMS_BYTES:
        raise ParamsError(
            f"{path} is larger than {MAX_PARAMS_BYTES // 2**20} MiB: not a params file. "
            f"Check the path given to --params."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path} is not UTF-8 text: {exc}. Save it as UTF-8.") from exc
    return parse_params(parse_yaml(text, str(path)), origin=str(path), prefix=prefix)
