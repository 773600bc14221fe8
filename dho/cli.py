"""The `dho` command line: parses options and dispatches to the Python API.

Every command is a thin wrapper over one function (`dho.data.prepare`, `dho.precompute.precompute`,
`dho.distill.distill`, ...). Heavy modules are imported inside each command so `dho --help`
stays fast and `dho distill` never imports the teacher code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="dho",
    help=(
        "Distill a large vision-language model into a small classifier with Dual-Head "
        "Optimization (DHO).\n\n"
        "Pipeline: prepare/index/split (datasets) -> precompute-teacher (teacher cache, once) "
        "-> distill (students, many times) -> evaluate/predict/export."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


# --------------------------------------------------------------------------------------------
# data layer
# --------------------------------------------------------------------------------------------


@app.command()
def prepare(
    src: Annotated[Path, typer.Argument(help="ImageFolder tree: one sub-folder per class (class index = position in sorted folder names).")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset folder (webdataset shards + manifest.json).")],
    shard_size: Annotated[int, typer.Option(help="Samples per tar shard.")] = 1000,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out unreadable images (listed in the manifest) instead of failing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing dataset in OUT.")] = False,
) -> None:
    """Convert an ImageFolder tree into webdataset shards plus manifest.json (deterministic)."""
    from dho import data

    ds = data.prepare(src, out, shard_size=shard_size, skip_bad=skip_bad, overwrite=overwrite)
    typer.echo(f"wrote {ds.num_samples} samples in {len(ds.shards)} shards, {len(ds.classnames)} classes -> {out}")


@app.command()
def index(
    shards: Annotated[list[Path], typer.Argument(help="Existing webdataset .tar shards, in the order that defines the global sample order.")],
    classnames: Annotated[Path, typer.Option("--classnames", help="Text file with one class name per line (line i = class index i).")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write manifest.json into (shards are referenced, not copied).")],
    label_key: Annotated[str, typer.Option(help="Sample field holding the integer label; samples without it are unlabeled (-1).")] = "cls",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing manifest in OUT.")] = False,
) -> None:
    """Write a manifest for webdataset shards you already have (no image decoding)."""
    from dho import data

    ds = data.index(shards, classnames, out, label_key=label_key, overwrite=overwrite)
    typer.echo(f"indexed {ds.num_samples} samples in {len(ds.shards)} shards -> {out}")


@app.command()
def split(
    dataset: Annotated[Path, typer.Argument(help="Source dataset folder (with manifest.json).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the labeled subset (shards + manifest).")],
    shots: Annotated[Optional[int], typer.Option(help="K labeled samples per class.")] = None,
    percent: Annotated[Optional[float], typer.Option(help="P% of the data, class-balanced (at least one per class).")] = None,
    keys: Annotated[Optional[Path], typer.Option("--keys", help="File listing the labeled samples, one key or file name per line (e.g. SimCLR ImageNet 1%/10% lists).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the random choice of samples.")] = 0,
    val_per_class: Annotated[int, typer.Option(help="Also carve M samples per class (disjoint from the labeled ones) into a validation split.")] = 0,
    val_out: Annotated[Optional[Path], typer.Option("--val-out", help="Output folder for the validation split (needed with --val-per-class).")] = None,
    shard_size: Annotated[int, typer.Option(help="Samples per tar shard of the written splits.")] = 1000,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
) -> None:
    """Make the labeled subset (and optionally a validation split) as its own dataset."""
    from dho import data

    chosen = [x is not None for x in (shots, percent, keys)]
    if sum(chosen) != 1:
        _fail("give exactly one of --shots K, --percent P or --keys FILE")
    if val_per_class and val_out is None:
        _fail("--val-per-class needs --val-out DIR")
    labeled, val = data.split(
        dataset, out, shots=shots, percent=percent, keys_file=keys, seed=seed,
        val_per_class=val_per_class, val_out=val_out, shard_size=shard_size, overwrite=overwrite,
    )
    typer.echo(f"labeled split: {labeled.num_samples} samples -> {out}")
    if val is not None:
        typer.echo(f"validation split: {val.num_samples} samples -> {val_out}")


def main() -> None:
    """Console-script entry point: known input errors print one line, not a traceback."""
    from dho.errors import DhoError

    try:
        app()
    except DhoError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
