"""Ingest stage: image folder -> sharded uint8/uint16 Zarr store, manifest and rejected.json.

Each Dask task decodes the files of one output shard and writes that whole shard itself:
workers never ship pixels back to the parent (measured: that halves throughput), and no two
tasks ever write into the same shard (concurrent partial-shard writes lose data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import PIL
import tifffile
import zarr
from PIL import Image, UnidentifiedImageError, features

from pipeline.cache.entries import Cache, cache_key, open_cache
from pipeline.cache.filehash import hash_files, identities, known_hashes, remember_hashes
from pipeline.cache.packs import (
    Packed,
    add_pack,
    decoded_key,
    drop_superseded,
    load_index,
    mark_used,
    read_packed,
)
from pipeline.core.digests import image_digest, image_digests
from pipeline.core.errors import BadImagesError, ParamsError, PipelineError
from pipeline.core.lineage import library_versions
from pipeline.core.location import Location, parse_location
from pipeline.core.outputs import check_output
from pipeline.core.publish import publish
from pipeline.core.reach import require_reachable
from pipeline.core.runner import run_tasks
from pipeline.ingest import colour16
from pipeline.ingest import images as images_module
from pipeline.ingest.images import (
    IMAGE_EXTENSIONS,
    SPLITS,
    Decoded,
    DecodeError,
    SourceFile,
    decode_image,
    list_images,
    list_remote_images,
    name_conflicts,
    nfc,
    output_channels,
    outside_source,
    split_of,
)
from pipeline.params import IngestParams, Params
from pipeline.zarrstore.shardwrite import write_shard
from pipeline.zarrstore.store import (
    PREPARED_SCHEMA,
    create_images_array,
    prepared_fingerprint,
    split_ranges,
    thread_buffer,
    write_json,
    write_small_array,
)

__all__ = ["IngestResult", "ShardResult", "decode_config", "run_ingest"]


@dataclass(frozen=True, kw_only=True)
class IngestResult:
    """What the stage wrote: counts per split and the rejected files."""

    count: int
    per_split: dict[str, int]
    rejected: list[tuple[str, str]]
    from_cache: int  # files whose decoded pixels came from the cache


def assign(relpaths: Sequence[str], params: IngestParams) -> list[SourceFile]:
    """Label and split of every file, ordered by split then path.

    ``relpaths`` are on-disk names; labels, splits and order come from their NFC form, so a
    folder gives the same result whichever normalization its file system uses.
    """
    files = []
    outside = []
    for disk in relpaths:
        rel = nfc(disk)
        parts = rel.split("/")
        if params.split.method == "folders":
            if len(parts) < 2 or parts[0] not in SPLITS:
                outside.append(rel)
                continue
            split, label = parts[0], parts[1] if len(parts) > 2 else ""
        else:
            split = split_of(rel, val=params.split.val, test=params.split.test)
            label = parts[0] if len(parts) > 1 else ""
        files.append(
            SourceFile(relpath=rel, label=label, split=split, disk="" if disk == rel else disk)
        )
    if outside:
        shown = "\n".join(f"  {p}" for p in outside[:20])
        more = f"\n  ... and {len(outside) - 20} more" if len(outside) > 20 else ""
        raise ParamsError(
            f"With ingest.split.method: folders every image must be under a top-level train/, "
            f"val/ or test/ folder; {len(outside)} file(s) are not:\n{shown}{more}\n"
            f"Move them, or use ingest.split.method: hash."
        )
    order = {s: i for i, s in enumerate(SPLITS)}
    return sorted(files, key=lambda f: (order[f.split], f.relpath))


@dataclass(frozen=True, kw_only=True)
class ShardResult:
    """What one shard task did: a record per file, cache hits, packed keys, pixel digests."""

    records: list[dict[str, Any]]
    hits: int  # files whose decoded pixels came from the cache
    packed: list[str]  # cache keys of the images in the new pack (none when it was not kept)
    digests: np.ndarray  # (n,) uint32 CRC-32C of each stored image (zeros: unusable file)


def _probe_shape(
    root: Location, files: Sequence[SourceFile], params: IngestParams
) -> tuple[int, int, int]:
    """(H, W, C) of the store: ingest.image_size, or the first readable image's upright size."""
    for f in files:
        try:
            where = root / f.on_disk
            source = where.local if where.local else io.BytesIO(where.read_bytes())
            with Image.open(source) as im:
                mode = im.mode
                w, h = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    w, h = h, w
        except (OSError, UnidentifiedImageError, ValueError):
            continue
        channels = output_channels(params.color, mode)
        if params.image_size is not None:
            return (*params.image_size, channels)
        return (h, w, channels)
    return (*(params.image_size or (1, 1)), 3)


def decode_config(ip: IngestParams, channels: int) -> str:
    """Key of everything besides a file's bytes that determines its decoded pixels.

    The decode params (not the split: it does not change pixels), the channel count, the
    decoding code itself and the versions of Pillow, its codec libraries and tifffile.
    """
    decode = ip.decode_dict()
    decode.pop("split", None)
    codecs = {name: str(features.version(name)) for name in ("jpg", "zlib", "libtiff", "webp")}
    return cache_key(
        {
            "decode": decode,
            "channels": channels,
            "code": hashlib.sha256(
                b"".join(Path(str(m.__file__)).read_bytes() for m in (images_module, colour16))
            ).hexdigest(),
            "versions": {
                "pillow": PIL.__version__,
                "numpy": np.__version__,
                "tifffile": tifffile.__version__,
                **codecs,
            },
        }
    )


def _record(d: Decoded) -> dict[str, Any]:
    """The manifest record of a decoded file."""
    return {
        "sha256": d.sha256,
        "format": d.format,
        "mode": d.mode,
        "width": d.width,
        "height": d.height,
        "frames": d.frames,
        "orientation": d.orientation,
        "bits": d.bits,
    }


def _read_remote(root: Location, relpaths: Sequence[str]) -> dict[str, bytes | Exception]:
    """The bytes of each file (or the error reading it), fetched concurrently by fsspec."""
    paths = {(root / rel).path: rel for rel in relpaths}
    got = root.fs.cat(list(paths), on_error="return")
    return {paths[p]: data for p, data in got.items()}


def _decode_shard(
    root: Location,
    work: bytes,
    images: Location,
    start: int,
    params: IngestParams,
    shape: tuple[int, int, int],
    cache: Cache,
    config: str,
) -> ShardResult:
    """Decode the files of one shard (or take them from the cache) and write the whole shard.

    ``work`` is the pickled list of each file's path and where the cache holds its decoded
    pixels, if it does. The shard is then kept in the cache as a pack of all its images.
    """
    items: list[tuple[str, Packed | None]] = pickle.loads(work)
    array = zarr.open_array(images.zarr(), mode="r+")
    buf = thread_buffer((len(items), *shape), array.dtype)
    fetched = {} if root.local else _read_remote(root, [rel for rel, c in items if c is None])
    records: list[dict[str, Any]] = []
    keep: list[tuple[int, str, int, dict[str, Any]]] = []
    hits = 0
    for i, (rel, cached) in enumerate(items):
        if cached is not None and read_packed(cached, buf[i]):
            records.append(cached.record)
            keep.append(
                (i, decoded_key(cached.record["sha256"], config), cached.crc32, cached.record)
            )
            hits += 1
            continue
        if root.local is None:
            got = fetched[rel]
            if isinstance(got, Exception):
                records.append({"error": f"cannot read: {got}"})
                continue
            data = got
        else:
            try:
                with open(os.path.join(root.local, rel), "rb") as fh:
                    data = fh.read()
            except OSError as exc:
                records.append({"error": f"cannot read: {exc.strerror}"})
                continue
        try:
            d = decode_image(data, params, channels=shape[2], name=rel)
            if d.pixels.shape != shape:
                raise DecodeError(
                    f"size {d.pixels.shape[1]}x{d.pixels.shape[0]} differs from the first "
                    f"image's {shape[1]}x{shape[0]}; set ingest.image_size to resize all images"
                )
        except DecodeError as exc:
            records.append({"error": str(exc), "sha256": hashlib.sha256(data).hexdigest()})
            continue
        buf[i] = d.pixels
        record = _record(d)
        records.append(record)
        if cache.enabled:
            keep.append((i, decoded_key(d.sha256, config), image_digest(buf[i]), record))
    for i, record in enumerate(records):
        if "error" in record:
            buf[i] = 0  # rows of unusable files hold zeros (they are compacted away)
    digests = image_digests(buf)
    shard_file = write_shard(array, images.local, start, buf)
    packed = add_pack(cache, config, buf, keep, shard_file=shard_file)
    return ShardResult(
        records=records,
        hits=hits,
        packed=[key for _, key, _, _ in keep] if packed else [],
        digests=digests,
    )


def _locate(
    index: dict[str, Packed],
    config: str,
    source: Path,
    relpaths: Sequence[str],
    shas: dict[str, str],
    params: Params,
) -> dict[str, Packed]:
    """Where ``index`` (the cache's packs) holds the decoded pixels of each file of ``relpaths``.

    ``shas`` holds the sha256 of files known unchanged; the others are hashed here (on
    threads) when the cache holds any image of this decode configuration at all.
    """
    if not index:
        return {}
    unknown = [rel for rel in relpaths if rel not in shas]
    if unknown:
        shas = {**shas, **hash_files(source, unknown, params.base.workers or os.cpu_count() or 1)}
    found = {rel: index.get(decoded_key(sha, config)) for rel, sha in shas.items()}
    return {rel: where for rel, where in found.items() if where is not None}


def _copy_shard(src_path: Location, dst_path: Location, indices: Sequence[int], start: int) -> None:
    """Gather ``indices`` from the candidate array into one whole shard of the output."""
    src = zarr.open_array(src_path.zarr(), mode="r")
    dst = zarr.open_array(dst_path.zarr(), mode="r+")
    block = np.asarray(src.get_orthogonal_selection(np.asarray(indices)))
    write_shard(dst, dst_path.local, start, block)


def _create(group: zarr.Group, n: int, shape: tuple[int, int, int], ip: IngestParams) -> None:
    """The (n, H, W, C) images array of the prepared store."""
    create_images_array(
        group,
        "images",
        shape=(n, *shape),
        dtype="uint8" if ip.bit_depth == 8 else "uint16",
        chunk_images=ip.chunk_images,
        shard_images=ip.shard_images,
        codec=ip.codec,
        codec_level=ip.codec_level,
    )


def _compact(
    store: Location,
    group: zarr.Group,
    kept: list[int],
    shape: tuple[int, int, int],
    ip: IngestParams,
    params: Params,
    progress: bool,
) -> None:
    """Rewrite ``images`` with only the ``kept`` samples, still one whole shard per task."""
    # A Zarr v3 array does not know its name, so it can be moved.
    if store.local is not None:
        os.replace(store.local / "images", store.local / "candidates")
    else:  # no rename on object storage: fsspec copies and deletes
        store.fs.invalidate_cache(store.path)
        store.fs.mv((store / "images").path, (store / "candidates").path, recursive=True)
    _create(group, len(kept), shape, ip)
    copies = [
        dask.delayed(_copy_shard, pure=True)(store / "candidates", store / "images", kept[a:b], a)
        for a, b in _shards(len(kept), ip.shard_images)
    ]
    run_tasks(copies, params.base, kind="io", progress=progress, shared=[store], writes=[store])
    if store.local is not None:
        shutil.rmtree(store.local / "candidates")
    else:
        (store / "candidates").remove()


def _duplicate_groups(
    files: Sequence[SourceFile], records: Sequence[dict[str, Any]]
) -> list[list[str]]:
    """Paths of usable files with identical bytes, grouped, in store order."""
    by_hash: dict[str, list[str]] = {}
    for f, r in zip(files, records, strict=True):
        if "error" not in r:
            by_hash.setdefault(r["sha256"], []).append(f.relpath)
    return [paths for paths in by_hash.values() if len(paths) > 1]


def _shards(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def run_ingest(
    source: str | os.PathLike[str] | Location,
    out: str | os.PathLike[str] | Location,
    params: Params,
    *,
    progress: bool = False,
    cache: Cache | None = None,
) -> IngestResult:
    """Run the ingest stage: decode ``source`` into the prepared folder ``out``.

    Either may be a local path or an fsspec URL. Files decoded before with the same decode
    configuration come from ``cache`` (default: the one :func:`pipeline.cache.entries.open_cache`
    names); the output bytes are the same either way. The cache is for local folders only:
    its packs are hard links of local shard files, and the identities it remembers source
    files by are local ones, so with a URL it is switched off.
    """
    ip = params.ingest
    cache = cache if cache is not None else open_cache()
    src = parse_location(source, "SOURCE").resolve()
    dest = parse_location(out, "OUT")
    check_output(dest, "ingest", {"SOURCE": src})
    if not (src.is_local and dest.is_local):
        cache = dataclasses.replace(cache, enabled=False)
        require_reachable([src], [dest])
    if src.local:
        relpaths, broken = list_images(src.local, max_bytes=ip.max_file_bytes)
    else:
        relpaths, broken = list_remote_images(src, max_bytes=ip.max_file_bytes)
    relpaths, conflicts = name_conflicts(relpaths)
    broken = sorted(broken + conflicts)
    files = assign(relpaths, ip)
    if not files and not broken:
        raise PipelineError(
            f"No image files found under {src} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})."
        )
    shape = _probe_shape(src, files, ip)
    config = decode_config(ip, shape[2])
    relpaths = [f.on_disk for f in files]
    ids: dict[str, Any] = {}
    index: dict[str, Packed] = {}
    cached: dict[str, Packed] = {}
    if cache.enabled and src.local is not None:
        ids = identities(src.local, relpaths)
        shas = known_hashes(cache, src.local, ids)
        index = load_index(cache, config)
        cached = _locate(index, config, src.local, relpaths, shas, params)
    with publish(dest) as tmp:
        store = tmp / "images.zarr"
        group = zarr.open_group(store.zarr(), mode="w")
        _create(group, len(files), shape, ip)
        tasks = [
            dask.delayed(_decode_shard, pure=True)(
                src,
                # Pickled: Dask walks and tokenizes every dataclass and dict in a task's
                # arguments, which took 4.5 s for 22,000 cached files.
                pickle.dumps([(rel, cached.get(rel)) for rel in relpaths[a:b]]),
                store / "images",
                a,
                ip,
                shape,
                cache,
                config,
            )
            for a, b in _shards(len(files), ip.shard_images)
        ]
        results = run_tasks(
            tasks, params.base, kind="decode", progress=progress, shared=[src, tmp], writes=[tmp]
        )
        records = [r for result in results for r in result.records]
        digests = np.concatenate([np.zeros(0, np.uint32)] + [r.digests for r in results])
        from_cache = sum(result.hits for result in results)
        if cache.enabled and src.local is not None:
            mark_used(cached.values())
            drop_superseded(index, {key for result in results for key in result.packed})
            remember_hashes(
                cache,
                src.local,
                ids,
                {
                    f.on_disk: r["sha256"]
                    for f, r in zip(files, records, strict=True)
                    if "sha256" in r
                },
            )
        bad = broken + [
            (f.relpath, r["error"]) for f, r in zip(files, records, strict=True) if "error" in r
        ]
        if bad and ip.on_error == "fail":
            raise BadImagesError(sorted(bad))
        groups = _duplicate_groups(files, records)
        dropped = []
        if ip.duplicates == "drop":
            dropped = [
                (p, f"duplicate of {g[0]} (same sha256), dropped by ingest.duplicates")
                for g in groups
                for p in g[1:]
            ]
        rejected = sorted(bad + dropped)
        removed = {p for p, _ in dropped}
        kept = [
            i for i, r in enumerate(records) if "error" not in r and files[i].relpath not in removed
        ]
        if not kept:
            raise PipelineError(
                f"None of the {len(rejected)} files under {src} is usable; "
                f"see the reasons above or in rejected.json."
            )
        if len(kept) < len(files):
            _compact(store, group, kept, shape, ip, params, progress)
        kept_files = [files[i] for i in kept]
        outside = outside_source(src.local, [f.on_disk for f in kept_files]) if src.local else set()
        kept_records = [
            {**records[i], "outside_source": True} if files[i].on_disk in outside else records[i]
            for i in kept
        ]
        manifest = _write_manifest(tmp / "manifest.jsonl", kept_files, kept_records)
        write_json(tmp / "rejected.json", [{"path": p, "reason": r} for p, r in rejected])
        write_json(tmp / "duplicates.json", [{"paths": g} for g in groups])
        _write_sample_arrays(group, kept_files)
        kept_digests = digests[kept]
        write_small_array(group, "crc32c", kept_digests, ("sample",))
        classes = sorted({f.label for f in kept_files if f.label})
        per_split = {s: sum(1 for f in kept_files if f.split == s) for s in SPLITS}
        bounds = split_ranges(np.array([SPLITS.index(f.split) for f in kept_files]))
        fingerprint = prepared_fingerprint(manifest, ip.decode_dict(), kept_digests)
        group.attrs.update(
            {
                "schema": PREPARED_SCHEMA,
                "classes": classes,
                "splits": bounds,
                "fingerprint": fingerprint,
                "manifest_sha256": manifest,
                "pixel_max": 255 if ip.bit_depth == 8 else 65535,
                "channels": shape[2],
                "decode": ip.decode_dict(),
                "decode_config": config,
                "versions": library_versions(),
            }
        )
    cache.trim()
    return IngestResult(
        count=len(kept), per_split=per_split, rejected=rejected, from_cache=from_cache
    )


def _write_manifest(
    path: Location, files: Sequence[SourceFile], records: Sequence[dict[str, Any]]
) -> str:
    """One JSON line per stored sample, in store order; return the file's sha256."""
    lines = []
    for index, (f, r) in enumerate(zip(files, records, strict=True)):
        row = {"index": index, "path": f.relpath, "label": f.label, "split": f.split, **r}
        lines.append(json.dumps(row, sort_keys=True, ensure_ascii=True))
    data = ("\n".join(lines) + "\n").encode("ascii")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _write_sample_arrays(group: zarr.Group, files: Sequence[SourceFile]) -> None:
    """label (int16, -1 = none), split (uint8 code) and path (string) per sample."""
    n = len(files)
    classes = sorted({f.label for f in files if f.label})
    index = {c: i for i, c in enumerate(classes)}
    codes = {s: i for i, s in enumerate(SPLITS)}
    label = group.create_array(
        "label", shape=(n,), chunks=(n,), dtype="int16", dimension_names=("sample",), fill_value=-1
    )
    label[:] = np.array([index.get(f.label, -1) for f in files], dtype=np.int16)
    split = group.create_array(
        "split",
        shape=(n,),
        chunks=(n,),
        dtype="uint8",
        dimension_names=("sample",),
        attributes={"codes": list(SPLITS)},
    )
    split[:] = np.array([codes[f.split] for f in files], dtype=np.uint8)
    path = group.create_array(
        "path", shape=(n,), chunks=(n,), dtype=str, dimension_names=("sample",)
    )
    # File names that are not valid UTF-8 (kept by Python as surrogate escapes) are stored with
    # backslash escapes here; manifest.jsonl keeps them exactly.
    path[:] = np.array(
        [os.fsencode(f.relpath).decode("utf-8", "backslashreplace") for f in files], dtype=object
    )
