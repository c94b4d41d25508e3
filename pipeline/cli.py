"""The ``pipeline`` command: one thin subcommand per stage.

Commands take paths as arguments and values from params.yaml (or ``--params FILE``); a
PipelineError becomes one message on stderr and exit status 1.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer

from pipeline.core.errors import PipelineError
from pipeline.params import Params, load_params

app = typer.Typer(
    name="pipeline",
    help="Dataset-versioned image normalization: DVC stages and tools.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

ParamsOption = Annotated[
    Path | None,
    typer.Option(
        "--params",
        help="Params file to read instead of params.yaml in the working directory.",
        exists=True,
        dir_okay=False,
        resolve_path=True,
    ),
]


PREPARED_HELP = "Prepared folder written by `pipeline ingest`: a path or an fsspec URL."


def _one_line(text: str, limit: int = 200) -> str:
    """The first line of ``text``, cut to ``limit`` characters."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= limit else first[:limit] + "..."


def _reports_errors(fn: F) -> F:
    """Turn every failure into one stderr line: PipelineError and OSError exit 1, Ctrl-C 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PipelineError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        except OSError as exc:  # disk full, read-only or missing paths: the OS says it best
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        except KeyboardInterrupt as exc:  # also when raised inside Dask; outputs are atomic
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from exc
        except (typer.Exit, click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if os.environ.get("PIPELINE_DEBUG") == "1":
                traceback.print_exc(file=sys.stderr)
            typer.echo(
                f"error: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
                f"(set PIPELINE_DEBUG=1 to see the traceback)",
                err=True,
            )
            raise typer.Exit(1) from exc

    return wrapper  # type: ignore[return-value]


def _bad_option(option: str, value: object, allowed: str) -> PipelineError:
    return PipelineError(f"{option} is {value}; allowed: {allowed}.")


# The global options of this invocation, set by main() before any command runs.
_GLOBAL = {"params_prefix": ""}


def _load(path: Path | None) -> Params:
    """load_params with the global --params-prefix."""
    return load_params(path, prefix=_GLOBAL["params_prefix"])


def _show_version(value: bool) -> None:
    if value:
        from pipeline import __version__

        typer.echo(f"pipeline {__version__}")
        raise typer.Exit()


@app.callback()
@_reports_errors
def main(
    version_check: Annotated[
        str | None,
        typer.Option(
            "--version-check",
            metavar="VERSION",
            help="Refuse to run unless this version of pipeline is installed (written into "
            "the stages by `pipeline init`).",
        ),
    ] = None,
    params_prefix: Annotated[
        str,
        typer.Option(
            "--params-prefix",
            metavar="PREFIX",
            envvar="PIPELINE_PARAMS_PREFIX",
            help="Read the params sections PREFIXbase, PREFIXingest, ... (`pipeline init "
            "--prefix`).",
        ),
    ] = "",
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Dataset-versioned image normalization: DVC stages and tools."""
    from pipeline.params import parse_prefix

    _GLOBAL["params_prefix"] = parse_prefix(params_prefix)
    if version_check is not None:
        from pipeline.tools.project import check_version

        check_version(version_check)


@app.command()
@_reports_errors
def sample(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the sample images into.")],
    params: ParamsOption = None,
) -> None:
    """Build the embedded sample collection of real photos (from scikit-image) in OUT_DIR."""
    from pipeline.sample.stage import run_sample

    p = _load(params).sample
    n = run_sample(out_dir, seed=p.seed, images_per_class=p.images_per_class)
    typer.echo(f"sample: wrote {n} images to {out_dir}")


@app.command()
@_reports_errors
def ingest(
    source: Annotated[
        str, typer.Argument(help="Image folder (searched recursively): path or fsspec URL.")
    ],
    out: Annotated[
        str,
        typer.Argument(help="Output folder: images.zarr, manifest, rejected.json; path or URL."),
    ],
    params: ParamsOption = None,
) -> None:
    """Decode SOURCE into the sharded Zarr store OUT/images.zarr with its manifest."""
    from pipeline.ingest.stage import run_ingest

    result = run_ingest(source, out, _load(params), progress=True)
    splits = ", ".join(f"{k} {v}" for k, v in result.per_split.items())
    typer.echo(f"ingest: {result.count} images ({splits}) -> {out}/images.zarr")
    if result.from_cache:
        typer.echo(f"ingest: {result.from_cache} file(s) unchanged, taken from the cache", err=True)
    if result.rejected:
        typer.echo(
            f"ingest: skipped {len(result.rejected)} unusable file(s); reasons in "
            f"{out}/rejected.json",
            err=True,
        )


@app.command()
@_reports_errors
def stats(
    prepared: Annotated[str, typer.Argument(help=PREPARED_HELP)],
    out_dir: Annotated[
        str, typer.Argument(help="Output folder: stats.json and stats.zarr; path or URL.")
    ],
    params: ParamsOption = None,
) -> None:
    """Fit exact statistics on the stats.fit_split split of PREPARED, in one chunked pass."""
    from pipeline.core.location import parse_location
    from pipeline.stats.stage import run_stats

    images = parse_location(prepared, "PREPARED") / "images.zarr"
    run = run_stats(images, out_dir, _load(params), progress=True)
    doc = run.document
    if run.reused is not None:
        typer.echo(
            f"stats: reused the cached fit; reduced {run.reused.added} added and "
            f"{run.reused.removed} removed image(s)",
            err=True,
        )
    per = doc["channels"]
    summary = ", ".join(f"{c} {per[c]['mean']:.3f}/{per[c]['std']:.3f}" for c in per)
    typer.echo(
        f"stats: {doc['count']['images']} {doc['fit_split']} images; mean/std {summary} "
        f"-> {out_dir}/stats.json"
    )


@app.command()
@_reports_errors
def normalize(
    prepared: Annotated[str, typer.Argument(help=PREPARED_HELP)],
    stats_dir: Annotated[
        str, typer.Argument(help="Stats folder written by `pipeline stats`; path or URL.")
    ],
    out: Annotated[
        str, typer.Argument(help="Output folder for the normalized images.zarr; path or URL.")
    ],
    params: ParamsOption = None,
) -> None:
    """Apply the fitted statistics to every split of PREPARED: OUT/images.zarr with lineage."""
    from pipeline.normalize.stage import run_normalize

    lineage = run_normalize(prepared, stats_dir, out, _load(params), progress=True)
    typer.echo(
        f"normalize: mode {lineage['mode']}, {lineage['dtype']}, stats "
        f"{lineage['stats']['sha256'][:12]} -> {out}/images.zarr"
    )


@app.command()
@_reports_errors
def verify(
    store: Annotated[
        str, typer.Argument(help="Normalized folder or images.zarr to check; path or URL.")
    ],
    sample: Annotated[
        int | None, typer.Option(help="Check only this many seeded random samples.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for --sample and --decode.")] = 0,
    source: Annotated[
        str | None,
        typer.Option(help="The image folder the prepared data was made from (for --decode)."),
    ] = None,
    decode: Annotated[
        int,
        typer.Option(help="Decode this many seeded source files afresh and compare them."),
    ] = 0,
    params: ParamsOption = None,
) -> None:
    """Check STORE: a normalized store is recomputed from its prepared store and stats, a
    prepared store's pixels are checked against their recorded digests; with --source and
    --decode N, N seeded source files are decoded afresh and compared. Exit 1 on any mismatch."""
    from pipeline.tools.verify import verify_store

    if sample is not None and sample < 1:
        raise _bad_option("--sample", sample, "an integer >= 1 (or leave it out to check all)")
    if not 0 <= seed < 2**32:
        raise _bad_option("--seed", seed, f"0..{2**32 - 1}")
    if decode < 0:
        raise _bad_option("--decode", decode, "an integer >= 0")
    if decode and source is None:
        raise PipelineError("verify --decode needs --source, the image folder ingest read.")
    report = verify_store(
        store,
        sample=sample,
        seed=seed,
        base=_load(params).base,
        source=source,
        decode=decode,
    )
    for problem in report.problems:
        typer.echo(f"verify: {problem}", err=True)
    if report.mismatched:
        shown = ", ".join(str(i) for i in report.mismatched[:20])
        typer.echo(f"verify: {len(report.mismatched)} sample(s) differ: {shown}", err=True)
    if not report.ok:
        raise typer.Exit(1)
    decoded = f", {report.decoded} source files decode to the same pixels" if report.decoded else ""
    typer.echo(f"verify: {report.checked} samples match{decoded}; checks out ({report.store})")


@app.command()
@_reports_errors
def show(
    store: Annotated[str, typer.Argument(help="Normalized folder or images.zarr; path or URL.")],
    indices: Annotated[list[int], typer.Argument(help="Sample indices to draw.")],
    out: Annotated[Path, typer.Option(help="Folder for the PNG files.")] = Path("show"),
) -> None:
    """Write PNGs of raw | normalized (rescaled for viewing) | denormalized samples."""
    from pipeline.reader.dataset import open_normalized
    from pipeline.tools.show import show_samples

    n = len(open_normalized(store, verify=False))
    for index in indices:
        if not -n <= index < n:
            raise PipelineError(
                f"Sample index {index} is out of range: {store} has {n} samples; "
                f"allowed: {-n}..{n - 1}."
            )
    for path in show_samples(store, indices, out):
        typer.echo(str(path))


@app.command()
@_reports_errors
def export(
    stats_dir: Annotated[
        str, typer.Argument(help="Stats folder written by `pipeline stats`; path or URL.")
    ],
    format: Annotated[
        str, typer.Option("--format", help="torchvision | albumentations | timm | keras | json")
    ] = "json",
    mode: Annotated[str, typer.Option(help="per_channel | global | per_pixel")] = "per_channel",
) -> None:
    """Print the fitted constants ready to paste, in the chosen library's units."""
    from pipeline.stats.document import load_stats
    from pipeline.tools.export import export_constants

    typer.echo(export_constants(load_stats(stats_dir), format, mode), nl=False)


@app.command()
@_reports_errors
def audit(
    revisions: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="REV",
            help="Git revisions (tag, branch, sha, HEAD~1) or `workspace`. Default: every tag "
            "by commit date, HEAD, workspace.",
        ),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option(help="stats.json to read (default: data/stats/stats.json at the repo root)."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON (sorted keys) instead of tables.")
    ] = False,
    fail_on_drift: Annotated[
        float | None,
        typer.Option(help="Exit 1 when a mean or std drift (in earlier stds) exceeds this."),
    ] = None,
    plots: Annotated[
        Path | None, typer.Option(help="Folder for PNGs: histograms, mean/std images, diffs.")
    ] = None,
) -> None:
    """Compare the statistics of data versions (git revisions): counts, mean, std, drift."""
    from pipeline.report.audit import audit_revisions, print_audit
    from pipeline.report.plots import write_audit_plots

    if fail_on_drift is not None and not 0 <= fail_on_drift < float("inf"):
        raise _bad_option("--fail-on-drift", fail_on_drift, "a finite number >= 0")
    if plots is not None:
        from pipeline.core.outputs import check_outside
        from pipeline.report.audit import DEFAULT_STATS
        from pipeline.report.revisions import repo_root

        json_path = stats if stats is not None else repo_root(Path.cwd()) / DEFAULT_STATS
        check_outside(plots, {"the stats folder": json_path.parent}, out_name="--plots")
    result = audit_revisions(revisions, stats_path=stats)
    print_audit(result, as_json=json_output)
    if plots is not None:
        written, notes = write_audit_plots(result, plots)
        for note in notes:
            typer.echo(f"audit: {note}", err=True)
        typer.echo(f"audit: wrote {len(written)} pictures to {plots}", err=True)
    drift = result.max_drift
    if fail_on_drift is not None and drift is not None and drift > fail_on_drift:
        typer.echo(f"audit: drift {drift:.4f} exceeds --fail-on-drift {fail_on_drift}", err=True)
        raise typer.Exit(1)


@app.command()
@_reports_errors
def report(
    stats_dir: Annotated[
        str, typer.Argument(help="Stats folder written by `pipeline stats`; path or URL.")
    ],
    out_dir: Annotated[Path, typer.Argument(help="Output folder for the plot files.")],
) -> None:
    """Write OUT_DIR/histogram.json, mean_image.png and std_image.png for `dvc plots`."""
    from pipeline.report.stage import write_report

    written = write_report(stats_dir, out_dir)
    typer.echo(f"report: {', '.join(p.name for p in written)} -> {out_dir}")


cache_app = typer.Typer(
    help="The local cache that lets ingest and stats reuse work for unchanged files.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")

CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir", help="Cache folder (default: $PIPELINE_CACHE_DIR, else ~/.cache/pipeline)."
    ),
]


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**9 else f"{n / 1e6:.1f} MB"


@cache_app.command("info")
@_reports_errors
def cache_info(directory: CacheDirOption = None) -> None:
    """Where the cache is, how much it holds and its size limit."""
    from pipeline.cache.entries import open_cache

    cache = open_cache(directory)
    if not cache.enabled:
        typer.echo("cache: off (PIPELINE_CACHE_DIR=off)")
        return
    info = cache.info()
    typer.echo(f"cache: {info.root}")
    for kind in info.entries:
        typer.echo(f"  {kind:8} {info.entries[kind]:>8} entries  {_size(info.bytes[kind]):>10}")
    total = sum(info.bytes.values())
    typer.echo(f"  total    {_size(total):>28} of {_size(info.limit)} (PIPELINE_CACHE_LIMIT)")
    if info.shared:
        typer.echo(
            f"  {_size(info.shared)} of the packs are hard links of prepared stores' shards: "
            f"no extra disk space while those stores exist"
        )


@cache_app.command("clear")
@_reports_errors
def cache_clear(directory: CacheDirOption = None) -> None:
    """Delete every cache entry: the next runs decode and reduce everything again."""
    from pipeline.cache.entries import open_cache
    from pipeline.core.registry import sweep_known

    cache = open_cache(directory)
    swept = sweep_known(cache.root) if cache.enabled else []
    freed = cache.clear() if cache.enabled else 0
    typer.echo(f"cache: cleared {_size(freed)} from {cache.root}")
    if swept:
        typer.echo(f"cache: removed {len(swept)} leftover(s) of killed runs beside outputs")


@app.command()
@_reports_errors
def init(
    source: Annotated[
        str, typer.Option(help="The image folder, relative to the project (params ingest.source).")
    ] = "data/images",
    prefix: Annotated[
        str,
        typer.Option(
            help="Name our params sections PREFIXbase, PREFIXingest, ... so they cannot "
            "collide with yours (e.g. imgnorm_)."
        ),
    ] = "",
    force: Annotated[
        bool, typer.Option(help="Rewrite this tool's own stages in dvc.yaml (never others).")
    ] = False,
    upgrade: Annotated[
        bool,
        typer.Option(help="Set the version in this tool's stage commands to the installed one."),
    ] = False,
) -> None:
    """Add the stages, params sections and .gitignore lines to the git + DVC project here
    (merged, never overwritten; runs dvc init when needed)."""
    from pipeline.tools.project import init_project

    result = init_project(Path.cwd(), source=source, prefix=prefix, force=force, upgrade=upgrade)
    if result.dvc_initialized:
        typer.echo("init: ran `dvc init`")
    if not result.changed:
        typer.echo("init: nothing to do; the stages and params are in place")
        return
    typer.echo(f"init: updated {', '.join(result.changed)}")
    exp = f"{prefix}normalize.mode=per_pixel"
    typer.echo(
        f"init: next: put your images in {source}, then `dvc add {source}` and `dvc repro` "
        f"(try `dvc exp run -S {exp}`)"
    )


@app.command()
@_reports_errors
def fit(
    folder: Annotated[Path, typer.Argument(help="Image folder (searched recursively).")],
    format: Annotated[
        str, typer.Option("--format", help="torchvision | albumentations | timm | keras | json")
    ] = "torchvision",
    split: Annotated[
        str | None,
        typer.Option(
            help="Fit on this split (train | val | test | all) instead of stats.fit_split; "
            "anything but train is recorded as a non-train fit."
        ),
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            help="HEIGHTxWIDTH to resize every image to (ingest.resize), or `native` to keep "
            "the sizes (all must match). Default: ingest.image_size."
        ),
    ] = None,
    mode: Annotated[str, typer.Option(help="per_channel | global | per_pixel (json)")] = (
        "per_channel"
    ),
    params: ParamsOption = None,
) -> None:
    """Exact mean and std of an image folder, ready to paste, without a DVC project."""
    from pipeline.tools.fit import fit_folder

    p = _fit_params(_load(params), split, image_size)
    result = fit_folder(folder, p, fmt=format, mode=mode, progress=True)
    splits = ", ".join(f"{k} {v}" for k, v in result.per_split.items())
    typer.echo(f"fit: {folder}: {splits}; fitted on {p.stats.fit_split}", err=True)
    if result.rejected:
        typer.echo(f"fit: skipped {result.rejected} unusable file(s)", err=True)
    typer.echo(result.text, nl=False)


def _fit_params(p: Params, split: str | None, image_size: str | None) -> Params:
    """``p`` with the fit command's options applied (parsed like params.yaml values)."""
    import re

    from pipeline.params import parse_params

    raw = p.to_dict()
    if split is not None:
        raw["stats"].update(fit_split=split, allow_non_train_fit=split != "train")
    if image_size is not None:
        match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", image_size)
        if image_size != "native" and match is None:
            raise _bad_option("--image-size", image_size, "HEIGHTxWIDTH (e.g. 224x224) or native")
        raw["ingest"]["image_size"] = [int(v) for v in match.groups()] if match else None
    try:
        return parse_params(raw, origin="the fit options")
    except PipelineError as exc:
        for option, key in (("--split", "stats.fit_split"), ("--image-size", "ingest.image_size")):
            if key in str(exc):
                raise PipelineError(f"{option}: {exc}") from exc
        raise
