"""The options of `dho precompute-teacher` without torch: their defaults (the signature of `dho.precompute.precompute`
takes them from here, `dho --help` renders them) and the checks that need no dataset or teacher, which the CLI runs
before torch is imported and `precompute` runs where the options enter.

Out of scope: checks that need open_clip (pretrained tags) or the teacher.
"""

from __future__ import annotations

from pathlib import Path

from dho.errors import CacheError, check_choice, check_number
from dho.names import ETA, TEACHER_MODEL, TEACHER_PRETRAINED, TEACHER_TEMPLATES, ZETA, check_teacher_model

DEFAULT_VIEWS = 10  # augmented views per sample, each replayable by distill from its stored box
DEFAULT_BATCH_SIZE = 64  # images (sample-views) per teacher forward
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TEXT_CLASSIFIER_NORMS = ("renormalize", "mean")  # Eq. 1's re-normalised template mean | the reference DFN teacher's mean
# `precompute`'s default of each option that has one (a test keeps them equal to its signature)
DEFAULTS = {
    "model": TEACHER_MODEL, "pretrained": TEACHER_PRETRAINED, "templates": TEACHER_TEMPLATES,
    "text_classifier_norm": TEXT_CLASSIFIER_NORMS[0], "views": DEFAULT_VIEWS, "seed": 0, "batch_size": DEFAULT_BATCH_SIZE,
    "precision": "auto", "device": "auto", "workers": None, "eta": ETA, "zeta": ZETA, "topk": None,
    "shard_group": None, "image_size": None, "mean": None, "std": None,
}


def check_options(out, *, model, pretrained, views, batch_size, workers, seed, eta, zeta, precision, text_classifier_norm,
                  topk, shard_group, image_size, mean, std) -> None:
    """The name, range and choice checks of every option that needs no dataset or teacher."""
    check_teacher_model(model, pretrained)
    check_number("--views", views, low=1, integer=True)
    check_number("--batch-size", batch_size, low=1, integer=True)
    if workers is not None:  # None: what the machine has (dho.devices.default_workers)
        check_number("--workers", workers, low=0, integer=True)
    check_number("--seed", seed, low=0, high=2**32 - 1, integer=True)
    check_number("--eta", eta, low=0, low_open=True)
    check_number("--zeta", zeta, low=0, low_open=True)
    check_choice("--precision", precision, PRECISIONS)
    check_choice("--text-classifier-norm", text_classifier_norm, TEXT_CLASSIFIER_NORMS)
    out_path = Path(out)
    if out_path.exists() and not (out_path / "zarr.json").is_file() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise CacheError(f"{out_path}: no teacher cache here (no zarr.json) and not empty; --out must be a new folder, an "
                         "empty one or a cache to resume")
    if topk is not None:
        check_number("--topk", topk, low=1, integer=True)
    if shard_group is not None:
        check_number("--shard-group", shard_group, low=1, integer=True)
    if image_size is not None:
        check_number("--image-size", image_size, low=1, integer=True)
    for option, values in (("--mean", mean), ("--std", std)):
        for v in values or ():
            check_number(option, v, low=0, low_open=option == "--std")


def check_given(dataset, out, given: dict) -> None:
    """`check_options` of the options given on the command line (None = not given: `precompute`'s default), and the
    dataset's manifest (a wrong folder fails here, before torch is imported)."""
    from dho import data

    data.Dataset.open(dataset)
    values = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    check_options(out, **{k: values[k] for k in ("model", "pretrained", "views", "batch_size", "workers", "seed", "eta", "zeta",
                                                 "precision", "text_classifier_norm", "topk", "shard_group", "image_size",
                                                 "mean", "std")})
