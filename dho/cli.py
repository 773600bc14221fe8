"""The `dho` command line: parses options and dispatches to the Python API.

Every command is a thin wrapper over one function (`dho.data.prepare`, `dho.precompute.precompute`,
`dho.distill.distill` with the config `dho.distill.config.merge` builds, ...): options are checked
where they enter that function, not here. Heavy modules are imported inside each command so `dho --help`
stays fast and `dho distill` never imports the teacher code. `main()` is the one place that turns an
error a user can fix into one line (`fail`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import dataclasses

import typer
import typer.core

from dho.devices import DEVICE_HELP, default_workers_help  # torch-free
from dho.distill.config import DistillConfig  # torch-free: its defaults are the ones `dho distill --help` shows
from dho.errors import ConfigError
from dho.precompute_options import DEFAULTS as PRECOMPUTE_DEFAULTS  # torch-free, as precompute() takes them

DEVICE = f"{DEVICE_HELP}."  # the --device help of every command
DEVICE_RANKS = f"{DEVICE_HELP}; under torchrun each rank uses cuda:LOCAL_RANK."
BETA_GRID_HELP = ("beta values of an alpha/beta search: wide (0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 4) | reference "
                  "(0.5, 0.75, 1, 1.25, 1.5, 2, 4: the ten-dataset reference code's).")



WEIGHTS_HELP = ("ema | raw: of a run trained with `dho distill --ema`, its moving average of the weights or the trained "
                "weights (a run without --ema has only these).")
WEIGHTS_DEFAULT = "ema if the run has it, else raw"
TOME_HELP = ("Token merging (ToMe, paper Table 9) at inference: merge R tokens in every transformer block (bipartite "
             "soft matching of the attention keys, class token kept, size-weighted merge, proportional attention); ViT "
             "students only (open_clip or timm, class-token pooling). 0 is the unmerged model; Table 9's ViT-B/16 uses 8.")


def shown(value) -> str:
    """A default as --help shows it: none, on, off, or the value."""
    return "none" if value is None else "on" if value is True else "off" if value is False else str(value)


# `dho distill` passes on only the options given (None = not given), so the config's defaults are the ones that run:
# its --help shows them from DistillConfig, and `dho precompute-teacher --help` precompute()'s (one source each)
DISTILL_DEFAULTS = {f.name: shown(f.default) for f in dataclasses.fields(DistillConfig) if f.default is not dataclasses.MISSING}
# the panels of the long option lists (`dho distill --help`, `dho precompute-teacher --help`), in the order shown
RUN, DATA, MODEL, METHOD = "Run", "Data", "Model", "Method"
OPTIM, LOGGING, SPEED = "Optimisation and schedule", "Logging and checkpoints", "Speed"
DISTRIBUTED, FIDELITY = "Distributed", "Fidelity switches (the reference code's choices)"
TEACHER, VIEWS, TARGETS, PREPROCESS = "Teacher", "Views", "Stored targets", "Preprocessing overrides"
PANELS = (RUN, DATA, MODEL, TEACHER, VIEWS, METHOD, TARGETS, PREPROCESS, OPTIM, LOGGING, SPEED, DISTRIBUTED, FIDELITY)


class PanelCommand(typer.core.TyperCommand):
    """A command whose --help lists its options in sections, one per help panel (`rich_help_panel=`, in the order of
    PANELS; the others under "Options"), as plain text: the help stays rich-free (`rich_markup_mode=None`), where
    typer draws panels only with rich. A default given as a `show_default` text reads `[default: TEXT]`."""

    def format_options(self, ctx, formatter) -> None:
        args, sections = [], {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            opts, text = record
            if isinstance(param.show_default, str):  # click writes a text default in parentheses: "[default: (20)]"
                text = text.replace(f"default: ({param.show_default})", f"default: {param.show_default}")
            if param.param_type_name == "argument":
                args.append((opts, text))
            else:
                sections.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append((opts, text))
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        for name in sorted(sections, key=lambda n: PANELS.index(n) if n in PANELS else len(PANELS)):
            with formatter.section(name):
                formatter.write_dl(sections[name])


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
    rich_markup_mode=None,  # plain-text help, no rich (PanelCommand draws the panels); "[...]" in help texts shows literally
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        import dho

        typer.echo(f"dho {dho.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Distill a large vision-language model into a small classifier with Dual-Head Optimization (DHO)."""


def fail(message: str, code: int = 2) -> None:
    """Print `error: MESSAGE` (one line, stderr) and exit with `code`."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    sys.exit(code)


# --------------------------------------------------------------------------------------------
# data layer
# --------------------------------------------------------------------------------------------


@app.command(cls=PanelCommand, short_help="ImageFolder tree -> webdataset shards + manifest", epilog="Example: dho prepare /data/imagenet/train --out data/train --shard-size 1000")
def prepare(
    src: Annotated[Path, typer.Argument(help="ImageFolder tree: one sub-folder per class (class index = position in sorted folder names).")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset folder (webdataset shards + manifest.json).")],
    shard_size: Annotated[int, typer.Option(help="Samples per tar shard.")] = 1000,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out unreadable images (listed in the manifest's `skipped`) instead of failing.", show_default="off")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing non-empty OUT (the new dataset is built beside it, then swapped in).", show_default="off")] = False,
    shuffle: Annotated[bool, typer.Option("--shuffle/--no-shuffle", help="Write samples in a seeded random order so every shard mixes classes (training reads whole shards); --no-shuffle keeps folder order.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the shuffled sample order.")] = 0,
    classes_of: Annotated[Optional[Path], typer.Option("--classes-of", help="The class folders name classes of this list (a dho dataset, or a class names file: NAME or ID<TAB>NAME per line): the dataset takes its names and order, and records which of its classes it holds (ImageNet-V2/-Sketch/-R/-A against ImageNet's list).", show_default="none, the folder names")] = None,
    class_folders: Annotated[str, typer.Option(help="With --classes-of, a class folder is: name (a class id such as a WordNet id, or a class name) | index (the class index, as ImageNet-V2's 0 ... 999).")] = "name",
) -> None:
    """Convert an ImageFolder tree into webdataset shards plus manifest.json (deterministic)."""
    from dho import data

    ds = data.prepare(src, out, shard_size=shard_size, skip_bad=skip_bad, overwrite=overwrite, shuffle=shuffle, seed=seed,
                      classes_of=classes_of, class_folders=class_folders)
    subset = ds.manifest.get("class_subset_of")
    of = f" of the {subset['num_classes']} of {classes_of}" if subset else ""
    typer.echo(f"wrote {ds.num_samples} samples in {len(ds.shards)} shards, {len(ds.classnames)} classes{of} -> {out}")


@app.command(cls=PanelCommand, short_help="A manifest for webdataset shards you already have", epilog="Example: dho index 'shards/train-{000000..000127}.tar' --classnames classnames.txt --out data/train")
def index(
    shards: Annotated[list[str], typer.Argument(help="Existing webdataset .tar shards, in the order that defines the global sample order, as webdataset spells them: paths, brace ranges and lists ('train-{000000..000127}.tar', expanded by dho when quoted), file:PATH, or pipe:COMMAND for a command that prints the tar ('pipe:aws s3 cp s3://bucket/train-{000000..000127}.tar -'; recorded as given, run again whenever the dataset is read).")],
    classnames: Annotated[Path, typer.Option("--classnames", help="Text file with one class per line (line i = class index i): NAME, or ID<TAB>NAME (ID: the class's folder name, e.g. its WordNet id).")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write manifest.json into (shards are referenced, not copied).")],
    label_key: Annotated[str, typer.Option(help="Sample field holding the integer label; samples without it are unlabeled (-1).")] = "cls",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT/manifest.json.", show_default="off")] = False,
    classes_of: Annotated[Optional[Path], typer.Option("--classes-of", help="The class names are a subset of this list (a dho dataset or class names file); recorded in the manifest, every name checked.", show_default="none")] = None,
    pipe_timeout: Annotated[Optional[float], typer.Option("--pipe-timeout", help="Seconds a pipe: command may print nothing before it is stopped with an error (every later reader of the dataset takes $DHO_PIPE_TIMEOUT).", show_default="$DHO_PIPE_TIMEOUT, else 300")] = None,
) -> None:
    """Write a manifest for webdataset shards you already have (no image decoding)."""
    from dho import data

    ds = data.index(shards, classnames, out, label_key=label_key, overwrite=overwrite, classes_of=classes_of,
                    pipe_timeout=pipe_timeout)
    typer.echo(f"indexed {ds.num_samples} samples in {len(ds.shards)} shards -> {out}")


@app.command(cls=PanelCommand, short_help="A labeled subset (and a validation split) of a dataset", epilog="Example: dho split data/train --out data/train-1pct --percent 1 --seed 0")
def split(
    dataset: Annotated[Path, typer.Argument(help="Source dataset folder (with manifest.json).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the labeled subset (shards + manifest).")],
    shots: Annotated[Optional[int], typer.Option(help="K labeled samples per class (seeded). Give exactly one of --shots, --percent, --keys.", show_default="none")] = None,
    percent: Annotated[Optional[float], typer.Option(help="P% of the labeled samples, class-balanced: round(P% of N) split over classes in proportion to their sizes (largest remainder), at least one per class.", show_default="none")] = None,
    keys: Annotated[Optional[Path], typer.Option("--keys", help="File listing the labeled samples, one key, relative file name or file basename per line; blank lines and # comments ignored (e.g. SimCLR ImageNet 1%/10% lists).", show_default="none")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the random choice of samples.")] = 0,
    per_class: Annotated[Optional[str], typer.Option("--per-class", help="With --percent: 'proportional' (counts in proportion to class sizes, as above) or 'equal': the DHO reference's ImageNet split, the same count for every class by its cascade rounding (ImageNet: 13 per class at 1%, 128-129 at 10%), drawn as it draws (numpy.random.seed(SEED), numpy.random.choice per class over the class's samples in file order; the reference uses --seed 13).", show_default="proportional")] = None,
    sampler: Annotated[Optional[str], typer.Option("--sampler", help="With --shots: 'numpy' (dho's seeded permutations) or 'coop': CoOp's sampler (random.seed(SEED), random.sample(items, K) per class, classes as first seen, items in the order of the list the dataset was imported from; a class with fewer than K gives all, as Dassl's default): the shots CoOp draws for a seed, and the DHO reference's (its seed is 1). With --val-per-class the validation samples are drawn after all the labeled ones.", show_default="numpy")] = None,
    after: Annotated[Optional[Path], typer.Option("--after", help="With --sampler coop: continue the random stream of this labeled split (made with --sampler coop, same --seed), as CoOp draws the few-shot val right after the train shots.", show_default="none")] = None,
    val_per_class: Annotated[int, typer.Option(help="Also carve M samples per class (disjoint from the labeled ones) into a validation split.")] = 0,
    val_out: Annotated[Optional[Path], typer.Option("--val-out", help="Output folder for the validation split (needed with --val-per-class).", show_default="none")] = None,
    shard_size: Annotated[int, typer.Option(help="Samples per tar shard of the written splits.")] = 1000,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing non-empty output folders.", show_default="off")] = False,
) -> None:
    """Make the labeled subset (and optionally a validation split) as its own dataset."""
    from dho import data

    labeled, val = data.split(
        dataset, out, shots=shots, percent=percent, keys_file=keys, seed=seed,
        val_per_class=val_per_class, val_out=val_out, shard_size=shard_size, overwrite=overwrite,
        per_class=per_class, sampler=sampler, after=after,
    )
    typer.echo(f"labeled split: {labeled.num_samples} samples -> {out}")
    if val is not None:
        typer.echo(f"validation split: {val.num_samples} samples -> {val_out}")

@app.command("import-coop", cls=PanelCommand, short_help="A CoOp few-shot benchmark dataset as train/val/test", epilog="Example: dho import-coop oxford_pets /data/coop --out fs/data")
def import_coop(
    name: Annotated[str, typer.Argument(help="CoOp benchmark dataset: caltech101, oxford_pets, stanford_cars, oxford_flowers, food101, fgvc_aircraft, sun397, dtd, eurosat, ucf101 or imagenet (CoOp's spellings, e.g. OxfordPets, work too).")],
    root: Annotated[Path, typer.Argument(help="Folder holding the benchmark's dataset folders as CoOp's DATASETS.md lays them out (e.g. ROOT/oxford_pets/images + split_zhou_OxfordPets.json).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: OUT/train, OUT/val, OUT/test dho datasets (ImageNet: no val).")],
    shard_size: Annotated[int, typer.Option(help="Samples per tar shard.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the shuffled sample order in the shards.")] = 0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out unreadable images (listed in the manifest) instead of failing.", show_default="off")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT/train, OUT/val, OUT/test if they hold datasets written by dho.", show_default="off")] = False,
) -> None:
    """Import a dataset of the CoOp few-shot benchmark (its split and class names) as train/val/test datasets."""
    from dho.coop import import_coop as run_import

    parts = run_import(name, root, out, shard_size=shard_size, seed=seed, overwrite=overwrite, skip_bad=skip_bad)
    for part, ds in parts.items():
        typer.echo(f"{part}: {ds.num_samples} samples, {ds.num_classes} classes -> {ds.root}")


# --------------------------------------------------------------------------------------------
# stage 2: distill
# --------------------------------------------------------------------------------------------


@app.command(cls=PanelCommand, short_help="Train a student from datasets + teacher caches", epilog="Example: dho distill --labeled data/train-1pct --labeled-cache cache/train-1pct.zarr --unlabeled data/train --unlabeled-cache cache/train.zarr --student resnet18 --out runs/r18")
def distill(
    labeled: Annotated[Optional[Path], typer.Option("--labeled", help="Labeled dataset (made by `dho split`). [required unless in --config]", rich_help_panel=DATA)] = None,
    labeled_cache: Annotated[Optional[Path], typer.Option("--labeled-cache", help="Teacher cache of the labeled dataset. [required unless in --config]", rich_help_panel=DATA)] = None,
    unlabeled: Annotated[Optional[Path], typer.Option("--unlabeled", help="Unlabeled pool; unlabeled batches are drawn from labeled ∪ unlabeled (keys already in --labeled are not repeated). [required for every method but ce]", rich_help_panel=DATA)] = None,
    unlabeled_cache: Annotated[Optional[Path], typer.Option("--unlabeled-cache", help="Teacher cache of the unlabeled dataset. [required with --unlabeled]", rich_help_panel=DATA)] = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="Of ensemble caches (`dho merge-caches`): mean (the members' mean probabilities; at another --eta the mean of the members re-tempered) | a member's index (0, 1, ...) or name: train on that teacher alone (its probabilities, embeddings and text classifier). The labeled and unlabeled caches must hold the same ensemble.", show_default=DISTILL_DEFAULTS["teacher"], rich_help_panel=DATA)] = None,
    student: Annotated[Optional[str], typer.Option("--student", help="Student: resnet18, resnet50, mobilenet_v2, resnet-tiny, timm/NAME[.TAG] (any timm model, heads on its pooled features, its own preprocessing), an open_clip name (ViT-B-16, ViT-L-14, ...) or an open_clip model-config JSON. [required unless in --config]", rich_help_panel=MODEL)] = None,
    student_pretrained: Annotated[Optional[str], typer.Option("--student-pretrained", help="Student weights: torchvision weights name, open_clip tag, timm (the timm student's tag from the local Hugging Face cache, never downloaded) or a timm tag, a local checkpoint file (.pt/.safetensors), or none.", show_default=DISTILL_DEFAULTS["student_pretrained"], rich_help_panel=MODEL)] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="dho | ce | kd | ce+kd | ce+kd-feature | sskd | dhkd.", show_default=DISTILL_DEFAULTS["method"], rich_help_panel=METHOD)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (config.json, metrics.jsonl, checkpoints/, model.pt). [required unless in --config]", rich_help_panel=RUN)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML/JSON file of options, keyed by the flags (text-init: true, batch-size: 64; what RUN_DIR/config.yaml and --print-config hold) or by the names in RUN_DIR/config.json (init_heads_from_text); options given on the command line override it.", show_default="none", rich_help_panel=RUN)] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the options this command resolves (--config, then the command line) as YAML keyed by the flags, which --config reads back, and exit; nothing is written, nothing trains.", show_default="off", rich_help_panel=RUN)] = False,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs; one epoch = one pass over the unlabeled stream.", show_default=DISTILL_DEFAULTS["epochs"], rich_help_panel=OPTIM)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Labeled AND unlabeled samples per step, global over ranks (B+B).", show_default=DISTILL_DEFAULTS["batch_size"], rich_help_panel=OPTIM)] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate (betas 0.9, 0.999).", show_default=DISTILL_DEFAULTS["lr"], rich_help_panel=OPTIM)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay.", show_default=DISTILL_DEFAULTS["weight_decay"], rich_help_panel=OPTIM)] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warmup steps before the cosine decay.", show_default=DISTILL_DEFAULTS["warmup_steps"], rich_help_panel=OPTIM)] = None,
    warmup_fraction: Annotated[Optional[float], typer.Option(help="Warm-up as a fraction of all steps, in [0, 1] (replaces --warmup-steps; the ten-dataset reference: 0.1).", show_default=DISTILL_DEFAULTS["warmup_fraction"], rich_help_panel=OPTIM)] = None,
    lr_schedule: Annotated[Optional[str], typer.Option(help="warmup-cosine (linear warmup to lr, then cosine to 0 at the end; floor(stream/batch) steps per epoch) | reference (the authors' ImageNet code: warmup from 0.01*lr times a cosine over total-warmup steps from step 0; ceil(stream/batch) steps per epoch) | linear (the authors' ten-dataset code: linear warmup from 0, then linear to 0; ceil).", show_default=DISTILL_DEFAULTS["lr_schedule"], rich_help_panel=OPTIM)] = None,
    unlabeled_pool: Annotated[Optional[str], typer.Option(help="Unlabeled batches from: union (labeled ∪ unlabeled, Alg. 1) | exclude-labeled (the unlabeled pool without the labeled samples, as the reference code); an epoch is one pass over it.", show_default=DISTILL_DEFAULTS["unlabeled_pool"], rich_help_panel=FIDELITY)] = None,
    lambda_: Annotated[Optional[float], typer.Option("--lambda", help="Loss weight: lambda * L_CE + (1 - lambda) * L_KD.", show_default=DISTILL_DEFAULTS["lambda_"], rich_help_panel=METHOD)] = None,
    eta: Annotated[Optional[float], typer.Option(help="KD temperature eta; the KD term is scaled by eta^2. A cache stored at another eta is re-tempered exactly.", show_default=DISTILL_DEFAULTS["eta"], rich_help_panel=METHOD)] = None,
    zeta: Annotated[Optional[float], typer.Option(help="Scale 1/zeta of the aligned cosine kd_head of VLM students (Eq. 10).", show_default=DISTILL_DEFAULTS["zeta"], rich_help_panel=METHOD)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Inference mix stored with a dho model (Eq. 11); tune later with `dho evaluate --search-on`.", show_default=DISTILL_DEFAULTS["alpha"], rich_help_panel=METHOD)] = None,
    beta: Annotated[Optional[float], typer.Option(help="Inference temperature of kd_head stored with a dho model (Eq. 11).", show_default=DISTILL_DEFAULTS["beta"], rich_help_panel=METHOD)] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16.", show_default=DISTILL_DEFAULTS["precision"], rich_help_panel=SPEED)] = None,
    device: Annotated[Optional[str], typer.Option(help=DEVICE_RANKS, show_default=DISTILL_DEFAULTS["device"], rich_help_panel=DISTRIBUTED)] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader workers per rank; the data order depends on ranks x workers.", show_default=DISTILL_DEFAULTS["workers"], rich_help_panel=SPEED)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for initialisation and the data order.", show_default=DISTILL_DEFAULTS["seed"], rich_help_panel=OPTIM)] = None,
    view_sampling: Annotated[Optional[str], typer.Option(help="Which cached teacher view a sample gets: cycle (pass mod V) | random.", show_default=DISTILL_DEFAULTS["view_sampling"], rich_help_panel=DATA)] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Clip the global gradient norm to this value; 0 = off.", show_default=DISTILL_DEFAULTS["grad_clip"], rich_help_panel=OPTIM)] = None,
    accum_steps: Annotated[Optional[int], typer.Option(help="Gradient accumulation: forward passes per optimiser step (batch split evenly).", show_default=DISTILL_DEFAULTS["accum_steps"], rich_help_panel=OPTIM)] = None,
    grad_surgery: Annotated[Optional[str], typer.Option("--grad-surgery", help="none | pcgrad (PCGrad, Yu et al. 2020: the gradients of lambda*L_CE and (1-lambda)*L_KD projected off each other when they conflict, then averaged, as the authors' train_imgnet_pc_grad.py on ce+kd); with dho, ce+kd, ce+kd-feature, sskd, dhkd.", show_default=DISTILL_DEFAULTS["grad_surgery"], rich_help_panel=METHOD)] = None,
    ema: Annotated[Optional[float], typer.Option("--ema", help="Keep an exponential moving average of the student's weights with this decay (e.g. 0.9998; BatchNorm statistics averaged too, as timm's ModelEmaV3), updated after every optimiser step: validation, model.pt and so export/evaluate/predict use it (--weights raw: the trained weights). An extension, not the paper's.", show_default=DISTILL_DEFAULTS["ema"], rich_help_panel=OPTIM)] = None,
    ema_warmup: Annotated[Optional[bool], typer.Option("--ema-warmup", help="Warm the EMA's decay up as min(--ema, 1 - (1 + step)^(-2/3)) (timm's --model-ema-warmup).", show_default=DISTILL_DEFAULTS["ema_warmup"], rich_help_panel=OPTIM)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints (RUN_DIR/checkpoints/last.pt; also at each epoch end).", show_default=DISTILL_DEFAULTS["checkpoint_every"], rich_help_panel=LOGGING)] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Steps between metric/progress lines.", show_default=DISTILL_DEFAULTS["log_every"], rich_help_panel=LOGGING)] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps (smoke runs); the schedule keeps its full length.", show_default=DISTILL_DEFAULTS["max_steps"], rich_help_panel=OPTIM)] = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation dataset evaluated at the end of training (never the test set).", show_default=DISTILL_DEFAULTS["val"], rich_help_panel=DATA)] = None,
    eval_every_epoch: Annotated[Optional[bool], typer.Option("--eval-every-epoch", help="Also evaluate --val after every epoch.", show_default=DISTILL_DEFAULTS["eval_every_epoch"], rich_help_panel=LOGGING)] = None,
    log_grad_cosine: Annotated[Optional[int], typer.Option(help="Every N steps log cos(grad L_CE, grad L_KD) over the feature extractor (dho, ce+kd) and plot it; 0 = off.", show_default=DISTILL_DEFAULTS["log_grad_cosine"], rich_help_panel=LOGGING)] = None,
    text_init: Annotated[Optional[bool], typer.Option("--text-init/--no-text-init", help="Language-aware init of both heads from the student's own text encoder (VLM students).", show_default=DISTILL_DEFAULTS["init_heads_from_text"], rich_help_panel=MODEL)] = None,
    text_init_heads: Annotated[Optional[str], typer.Option("--text-init-heads", help="Which heads --text-init sets: both | ce (ce_head only; kd_head as with --no-text-init) | kd (the converse): Table 5's per-head rows.", show_default=DISTILL_DEFAULTS["text_init_heads"], rich_help_panel=MODEL)] = None,
    align_kd_head: Annotated[Optional[bool], typer.Option("--align-kd-head/--no-align-kd-head", help="Cosine kd_head aligned with the teacher's rule, Eq. 10 (VLM students).", show_default=DISTILL_DEFAULTS["align_kd_head"], rich_help_panel=MODEL)] = None,
    epoch: Annotated[Optional[str], typer.Option(help="unlabeled (an epoch is one pass over the unlabeled stream) | shorter (one pass over the shorter of the labeled and unlabeled streams, as the reference's zip of two loaders).", show_default=DISTILL_DEFAULTS["epoch"], rich_help_panel=FIDELITY)] = None,
    forward: Annotated[Optional[str], typer.Option(help="joint (one forward over [labeled; unlabeled], shared BatchNorm statistics) | separate (two forwards, as the ten-dataset reference).", show_default=DISTILL_DEFAULTS["forward"], rich_help_panel=FIDELITY)] = None,
    select_best_on_val: Annotated[Optional[bool], typer.Option("--select-best-on-val", help="Score --val after every epoch (dho: alpha/beta searched on it) and keep the best epoch as RUN/model.pt (+ alpha_beta.json), as the reference.", show_default=DISTILL_DEFAULTS["select_best_on_val"], rich_help_panel=FIDELITY)] = None,
    beta_grid: Annotated[Optional[str], typer.Option("--beta-grid", help=BETA_GRID_HELP + " Used by --select-best-on-val.", show_default=DISTILL_DEFAULTS["beta_grid"], rich_help_panel=FIDELITY)] = None,
    vlm_heads: Annotated[Optional[str], typer.Option(help="Aligned kd_head and text init of VLM students: reference (the authors' code: linear with bias on the normalised feature, times 1/zeta; heads start from the raw template-mean text embeddings) | eq10 (1/zeta * cos(z, w_c), unit rows, no bias; normalised text embeddings).", show_default=DISTILL_DEFAULTS["vlm_heads"], rich_help_panel=FIDELITY)] = None,
    ce_head: Annotated[Optional[str], typer.Option("--ce-head", help="Form of ce_head: linear (§3.2, the paper's main results) | mlp (§E.2: Linear -> LayerNorm -> GELU -> Dropout -> Linear; language-aware init then sets only the linear heads).", show_default=DISTILL_DEFAULTS["ce_head"], rich_help_panel=MODEL)] = None,
    kd_head: Annotated[Optional[str], typer.Option("--kd-head", help="Form of kd_head: linear | mlp (as --ce-head; an aligned kd_head keeps its form as the last layer, on the hidden features). Table 14: --ce-head mlp, --kd-head mlp, or both.", show_default=DISTILL_DEFAULTS["kd_head"], rich_help_panel=MODEL)] = None,
    head_hidden: Annotated[Optional[int], typer.Option("--head-hidden", help="Hidden width H of the mlp heads (the paper gives none); none = the student's feature dim D.", show_default=DISTILL_DEFAULTS["head_hidden"], rich_help_panel=MODEL)] = None,
    head_dropout: Annotated[Optional[float], typer.Option("--head-dropout", help="Dropout of the mlp heads, in [0, 1) (the paper gives none).", show_default=DISTILL_DEFAULTS["head_dropout"], rich_help_panel=MODEL)] = None,
    freeze_backbone: Annotated[Optional[bool], typer.Option("--freeze-backbone", help="Freeze the student's feature extractor g (linear evaluation / prompt tuning, Table 13): no gradients, out of the optimiser and weight decay, always in eval mode (BatchNorm on its running statistics, dropout off); only the heads (and --vpt-tokens prompts) train.", show_default=DISTILL_DEFAULTS["freeze_backbone"], rich_help_panel=MODEL)] = None,
    vpt_tokens: Annotated[Optional[int], typer.Option("--vpt-tokens", help="VPT-deep (Jia et al. 2022) for open_clip ViT students: N learned prompt tokens after the class token at the input of the first --vpt-depth blocks; 0 = none.", show_default=DISTILL_DEFAULTS["vpt_tokens"], rich_help_panel=MODEL)] = None,
    vpt_depth: Annotated[Optional[int], typer.Option("--vpt-depth", help="Blocks whose input gets (new) VPT prompt tokens, 1 to the ViT's depth (Table 13: VPT-3, VPT-9); 0 with --vpt-tokens 0.", show_default=DISTILL_DEFAULTS["vpt_depth"], rich_help_panel=MODEL)] = None,
    coop_context: Annotated[Optional[int], typer.Option("--coop-context", help="CoOp (Zhou et al. 2022) for open_clip CLIP students, with --freeze-backbone: ce_head is the class text embeddings of N learned context vectors ('[SOS] ctx_1..ctx_N class name . [EOS]') through the frozen text tower, times CLIP's logit scale; kd_head stays the linear head on z (CoOp+DHO, Table 13); model.pt holds the resulting class weights; 0 = a linear ce_head.", show_default=DISTILL_DEFAULTS["coop_context"], rich_help_panel=MODEL)] = None,
    promptsrc_tokens: Annotated[Optional[int], typer.Option("--promptsrc-tokens", help="PromptSRC (Khattak et al. 2023) for open_clip CLIP students, with --freeze-backbone and --method ce (PromptSRC alone) or dho (PromptSRC+DHO, Table 13): N prompt tokens at the input of the first --promptsrc-depth blocks of both towers (text context from 'a photo of a' for N <= 4); ce_head is the prompted text classifier, trained with CE + 25 L1(text features) + 10 L1(image features) + KL to the frozen CLIP's zero-shot logits; the Gaussian-weighted aggregate of the epochs' weights (GPA) becomes model.pt; kd_head stays the linear head on z; 0 = none (its DG config: 4).", show_default=DISTILL_DEFAULTS["promptsrc_tokens"], rich_help_panel=MODEL)] = None,
    promptsrc_depth: Annotated[Optional[int], typer.Option("--promptsrc-depth", help="PromptSRC: blocks of each tower whose input gets new prompts, 1 to the towers' depth (its DG config: 3); 0 with --promptsrc-tokens 0.", show_default=DISTILL_DEFAULTS["promptsrc_depth"], rich_help_panel=MODEL)] = None,
    interpolation: Annotated[Optional[str], typer.Option(help="Resampling of the student's training views and evaluation images: bilinear | bicubic; none keeps the student's own (bilinear for torchvision CNNs, the open_clip config's for VLM students).", show_default=DISTILL_DEFAULTS["interpolation"], rich_help_panel=MODEL)] = None,
    window: Annotated[Optional[int], typer.Option(help="Shards per shuffle window of each data consumer.", show_default=DISTILL_DEFAULTS["window"], rich_help_panel=SPEED)] = None,
    sync_bn: Annotated[Optional[bool], typer.Option("--sync-bn", help="Under torchrun on GPUs, BatchNorm statistics over the global batch (SyncBatchNorm) instead of each rank's share.", show_default=DISTILL_DEFAULTS["sync_bn"], rich_help_panel=DISTRIBUTED)] = None,
    compile_: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the student's forward and loss (the first steps compile, then faster steps; same math, other kernels, so not bit-identical to eager).", show_default=DISTILL_DEFAULTS["compile"], rich_help_panel=SPEED)] = None,
    report_to: Annotated[Optional[str], typer.Option("--report-to", help="Metric sinks, comma-separated: jsonl (RUN/metrics.jsonl, always), tensorboard (RUN/tensorboard), wandb (project $WANDB_PROJECT or dho; WANDB_MODE=offline works); names grouped as train/..., val/..., grad/....", show_default=DISTILL_DEFAULTS["report_to"], rich_help_panel=LOGGING)] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option("--keep-checkpoints", help="Checkpoints to keep: last.pt, plus checkpoints/step-S.pt of the newest N when N > 1 (the best epoch on --val is kept in checkpoints/best/ with --eval-every-epoch).", show_default=DISTILL_DEFAULTS["keep_checkpoints"], rich_help_panel=LOGGING)] = None,
    decode: Annotated[Optional[str], typer.Option(help="Where training views are decoded: cpu (DataLoader workers, PIL) | gpu (the batch's JPEGs decoded on the CUDA device with torchvision's decode_jpeg, box cropped and resized there; views differ from cpu by resampling noise).", show_default=DISTILL_DEFAULTS["decode"], rich_help_panel=SPEED)] = None,
    run_name: Annotated[Optional[str], typer.Option("--run-name", help="Display name of the W&B run (--report-to wandb); none names it after the run folder; may change on --resume.", show_default="none", rich_help_panel=LOGGING)] = None,
    group: Annotated[Optional[str], typer.Option("--group", help="W&B group of the run, e.g. a sweep or the seeds of one setting; may change on --resume.", show_default="none", rich_help_panel=LOGGING)] = None,
    tags: Annotated[Optional[str], typer.Option("--tags", help="W&B tags, comma-separated (e.g. r18,1pct); may change on --resume.", show_default="none", rich_help_panel=LOGGING)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a run exactly where its last checkpoint stopped: `dho distill --resume RUN_DIR` alone takes every option from RUN_DIR/config.json; options given as well must equal the run's. `--resume auto` with --out RUN and the run's options is the one command of a job that may be requeued (sbatch, submitit): it continues RUN if RUN holds a checkpoint made with these options, starts RUN if it is new or empty (or stopped before its first checkpoint), exits 0 leaving a finished RUN as it is, and refuses, naming them, other options.", show_default="off", rich_help_panel=RUN)] = False,
    run_dir: Annotated[Optional[str], typer.Argument(help="With --resume: the run folder to continue (instead of --out), or the word auto (see --resume; a folder named auto is ./auto).", show_default="none", rich_help_panel=RUN)] = None,
) -> None:
    """Train a student from datasets + teacher caches (the teacher is never loaded)."""
    from dho.distill.config import merge
    from dho.distill.precheck import check_before_start

    given = {
        "labeled": labeled, "labeled_cache": labeled_cache, "unlabeled": unlabeled, "unlabeled_cache": unlabeled_cache,
        "teacher": teacher,
        "student": student, "student_pretrained": student_pretrained, "method": method, "out": out, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
        "lr_schedule": lr_schedule, "unlabeled_pool": unlabeled_pool, "warmup_fraction": warmup_fraction,
        "epoch": epoch, "forward": forward, "select_best_on_val": select_best_on_val, "beta_grid": beta_grid, "lambda_": lambda_,
        "eta": eta, "zeta": zeta, "alpha": alpha, "beta": beta, "precision": precision, "device": device, "workers": workers,
        "seed": seed, "view_sampling": view_sampling, "grad_clip": grad_clip, "accum_steps": accum_steps,
        "grad_surgery": grad_surgery, "ema": ema, "ema_warmup": ema_warmup,
        "checkpoint_every": checkpoint_every, "log_every": log_every, "max_steps": max_steps, "val": val,
        "eval_every_epoch": eval_every_epoch, "log_grad_cosine": log_grad_cosine, "init_heads_from_text": text_init, "text_init_heads": text_init_heads,
        "align_kd_head": align_kd_head, "vlm_heads": vlm_heads, "ce_head": ce_head, "kd_head": kd_head,
        "head_hidden": head_hidden, "head_dropout": head_dropout, "freeze_backbone": freeze_backbone, "vpt_tokens": vpt_tokens,
        "vpt_depth": vpt_depth, "coop_context": coop_context, "promptsrc_tokens": promptsrc_tokens, "promptsrc_depth": promptsrc_depth,
        "interpolation": interpolation, "window": window,
        "sync_bn": sync_bn, "report_to": report_to, "keep_checkpoints": keep_checkpoints, "compile": compile_,
        "decode": decode, "run_name": run_name, "group": group, "tags": tags,
    }
    if resume and run_dir == "auto":  # `--resume auto`: the word, not a folder (that is ./auto)
        resume, run_dir = "auto", None
    cfg = merge(given, options_file=config, resume_dir=Path(run_dir) if run_dir is not None else None, resume=resume)
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    check_before_start(cfg)  # names, manifests, cache attributes, batch split: before torch loads (seconds)
    from dho.distill import distill as run_distill

    run_distill(cfg, resume=resume)


# --------------------------------------------------------------------------------------------
# evaluate · predict · export
# --------------------------------------------------------------------------------------------


@app.command(cls=PanelCommand, short_help="Top-1/top-5 of both heads and of Eq. 11 on a dataset", epilog="Example: dho evaluate runs/r18 --data data/test --search-on data/val\n\n"
             "Example: dho evaluate runs/vit-b16-1pct --data data/val --views random --draws 5 (Table 4 as the reference scored it)")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `dho distill` (reads RUN_DIR/model.pt).")],
    data: Annotated[Path, typer.Option("--data", help="Labeled dataset to evaluate on (the test split).")],
    alpha: Annotated[Optional[float], typer.Option(help="Weight of ce_head in Eq. 11, in [0, 1].", show_default="the run's (RUN_DIR/alpha_beta.json from an earlier --search-on, else the value stored in model.pt, 0.5 for dho)")] = None,
    beta: Annotated[Optional[float], typer.Option(help="Temperature of kd_head in Eq. 11, > 0.", show_default="the run's, as for --alpha")] = None,
    search_on: Annotated[Optional[Path], typer.Option("--search-on", help="Labeled validation dataset: grid-search alpha in {0, 0.05, ..., 1} x beta (--beta-grid) on it, store the best in RUN_DIR/alpha_beta.json (+ alpha_beta_heatmap.png), then evaluate --data with it. Must not be --data itself.", show_default="none")] = None,
    beta_grid: Annotated[str, typer.Option("--beta-grid", help=BETA_GRID_HELP)] = "wide",
    json_out: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object (ce_head, kd_head, combined: top1/top5 in %; alpha; beta; counts) instead of a table.", show_default="off")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    device: Annotated[str, typer.Option(help=DEVICE)] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader worker processes decoding images.")] = 2,
    views: Annotated[str, typer.Option("--views", help="center (open_clip's eval transform: resize, center-crop) | random (the reference's Table 4 evaluation: one training view per image, RandomResizedCrop scale 0.5-1 + flip, replayed at the student's size; --draws passes, their mean). The --search-on search always uses center.")] = "center",
    draws: Annotated[Optional[int], typer.Option("--draws", help="With --views random: passes over --data, each with a fresh random view per image (draw d of an image is seeded by --seed, its key and d); the metrics are their mean.", show_default="1")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="With --views random: seed of the views (the same seed gives the same views and numbers).", show_default="0")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help=WEIGHTS_HELP, show_default=WEIGHTS_DEFAULT)] = None,
    tome_r: Annotated[Optional[int], typer.Option("--tome-r", help=TOME_HELP + " Recorded under \"tome\" in --json.", show_default="none, no merging")] = None,
) -> None:
    """Top-1/top-5 of ce_head, kd_head and their combination (Eq. 11) on a labeled dataset."""
    from dho import evaluate as evaluation

    result = evaluation.evaluate(run_dir, data, alpha=alpha, beta=beta, search_on=search_on,
                                 batch_size=batch_size, device=device, workers=workers, beta_grid=beta_grid,
                                 views=views, draws=draws, seed=seed, weights=weights, tome_r=tome_r)
    if json_out:
        typer.echo(json.dumps(result))
        return
    of = f" of the model's {result['model_classes']}, scored on these only" if result["class_subset"] else ""
    typer.echo(f"run {run_dir}  data {result['data']} ({result['num_samples']} samples, {result['num_classes']} classes{of})")
    if result["num_unlabeled_ignored"]:
        typer.echo(f"left out {result['num_unlabeled_ignored']} unlabeled samples")
    typer.echo(f"alpha = {result['alpha']:g}, beta = {result['beta']:g}  ({result['alpha_beta_source']})")
    if "tome" in result:
        t = result["tome"]
        typer.echo(f"ToMe r = {t['r']}: tokens per block {t['tokens_per_block']} -> {t['tokens_out']}")
    spread = result.get("std")
    if "views" in result:
        typer.echo(f"views: random crops (RandomResizedCrop scale 0.5-1 + flip), seed {result['seed']}, "
                   f"mean of {result['draws']} draw{'s' if result['draws'] > 1 else ''}")
    typer.echo(f"{'head':<10} {'top-1':>7} {'top-5':>7}" + (f" {'sd top-1':>8} {'sd top-5':>8}" if spread else ""))
    for head in ("ce_head", "kd_head", "combined"):
        sd = f" {spread[head]['top1']:>8.2f} {spread[head]['top5']:>8.2f}" if spread else ""
        typer.echo(f"{head:<10} {result[head]['top1']:>7.2f} {result[head]['top5']:>7.2f}{sd}")


@app.command(cls=PanelCommand, short_help="The top-k classes of image files", epilog="Example: dho predict runs/r18 cat.jpg 'photos/*.png' --heads")
def predict(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `dho distill` (reads RUN_DIR/model.pt).")],
    images: Annotated[list[Path], typer.Argument(help="Image files (jpg, png, webp, ...), folders of them, or glob patterns ('photos/*.jpg', quoted so dho expands them; ** recurses).")],
    topk: Annotated[int, typer.Option(help="Classes to print per image, most probable first.")] = 5,
    device: Annotated[str, typer.Option(help=DEVICE)] = "auto",
    heads: Annotated[bool, typer.Option("--heads", help="Show the top-k of ce_head, kd_head (at temperature beta) and their combination side by side.", show_default="off")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object per image (one line each) instead of text.", show_default="off")] = False,
    weights: Annotated[Optional[str], typer.Option("--weights", help=WEIGHTS_HELP, show_default=WEIGHTS_DEFAULT)] = None,
    tome_r: Annotated[Optional[int], typer.Option("--tome-r", help=TOME_HELP, show_default="none, no merging")] = None,
) -> None:
    """Print the top-k classes and probabilities of each image (Eq. 11 with the run's alpha, beta)."""
    from dho import evaluate as evaluation

    for path, top in evaluation.predict(run_dir, images, topk=topk, device=device, heads=heads, weights=weights,
                                        tome_r=tome_r):
        if json_out:
            as_list = lambda t: [{"class": c, "prob": p} for c, p in t]
            typer.echo(json.dumps({"image": str(path), **({h: as_list(t) for h, t in top.items()} if heads else {"combined": as_list(top)})}))
            continue
        typer.echo(str(path))
        if not heads:
            for classname, prob in top:
                typer.echo(f"  {prob:.4f}  {classname}")
            continue
        width = max(12, *(len(c) for t in top.values() for c, _ in t))
        typer.echo("  " + "   ".join(f"{h:<{width + 8}}" for h in top).rstrip())
        for row in zip(*top.values()):
            typer.echo("  " + "   ".join(f"{p:.4f}  {c:<{width}}" for c, p in row).rstrip())


@app.command(cls=PanelCommand, short_help="A deployable model: pt2, ONNX, TorchScript, HF folder", epilog="Example: dho export runs/r18 --out r18.onnx (the format from the suffix: .pt2, .onnx, .ts)")
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `dho distill` (reads RUN_DIR/model.pt).")],
    out: Annotated[Path, typer.Option("--out", help="Model file to write, named for its format (model.pt2, model.onnx, model.ts); beside it OUT.safetensors (the student's weights) and OUT.json (class names, preprocessing, alpha, beta). With --format hf, the folder to write (new, empty, or an earlier hf export).")],
    fmt: Annotated[Optional[str], typer.Option("--format", help="pt2 (torch.export: torch.export.load(OUT).module()) | onnx (onnxruntime; needs pip install 'dho[onnx]') | torchscript (torch.jit.load) | hf (the folder OUT in Hugging Face style: config.json, model.safetensors, README.md model card; dho.load_run(OUT) or plain safetensors loads it, huggingface_hub.upload_folder publishes it); must agree with the suffix of --out.", show_default="the suffix of --out: .pt2, .onnx, .ts; hf: give --format hf")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help=WEIGHTS_HELP, show_default=WEIGHTS_DEFAULT)] = None,
    tome_r: Annotated[Optional[int], typer.Option("--tome-r", help=TOME_HELP + " Baked into the graph (pt2, onnx, torchscript; not hf), recorded under \"tome\" in OUT.json.", show_default="none, no merging")] = None,
) -> None:
    """Write a deployable model: uint8 RGB images (B, 3, H, W) of any size -> probabilities (B, C); preprocessing, student and Eq. 11 with the run's alpha/beta baked in."""
    from dho.export import HF_FORMAT, metadata_path, weights_path
    from dho.export import export as export_run
    from dho.export import format_for

    fmt = format_for(out, fmt)  # --out m.onnx: onnx
    path = export_run(run_dir, out, format=fmt, weights=weights, tome_r=tome_r)
    if fmt == HF_FORMAT:
        typer.echo(f"wrote {path}/ (hf): config.json, model.safetensors, README.md")
        return
    typer.echo(f"wrote {path} ({fmt}), {weights_path(path)}, {metadata_path(path)}")


@app.command(cls=PanelCommand, short_help="How the heads agree and fail, spectrum, probe, t-SNE", epilog="Example: dho analyze runs/r18 --data data/test --probe-train data/train --tsne")
def analyze(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `dho distill` (reads RUN_DIR/model.pt).")],
    data: Annotated[Path, typer.Option("--data", help="Labeled dataset to analyse (the test split), with the run's class list.")],
    probe_train: Annotated[Optional[Path], typer.Option("--probe-train", help="Labeled training dataset (not --data): freeze g, train a new linear head on its features, test it on --data (Table 3) -> probe.json.", show_default="none")] = None,
    tsne: Annotated[bool, typer.Option("--tsne", help="Also draw a t-SNE map of the features of --data (at most 2000 samples; needs scikit-learn) -> tsne.png.", show_default="off")] = False,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="Folder for heads.json/.png, spectrum.json/.png, probe.json, tsne.png.", show_default="RUN_DIR/analysis/<name of the --data folder>")] = None,
    examples: Annotated[Optional[int], typer.Option("--examples", help="Also pick N samples where only ce_head is right and N where only kd_head is right (the clearest first) and draw them with each head's top-3 predictions (Figs. 9, 16-19) -> examples.json, examples.png.", show_default="none")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object (the summary: top-1s, head outcomes in %, error reduction, effective rank, dominant eigenvalues, probe) instead of text.", show_default="off")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    device: Annotated[str, typer.Option(help=DEVICE)] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader worker processes decoding images.")] = 2,
) -> None:
    """How ce_head, kd_head and Eq. 11 agree and fail (Fig. 15), the feature spectrum and the heads' dominant eigenvalues (Fig. 13), optionally a linear probe (Table 3), a t-SNE map (Fig. 7) and the cases one head gets right (Figs. 9, 16-19)."""
    from dho import analyze as analysis

    result = analysis.analyze(run_dir, data, probe_train=probe_train, tsne=tsne, batch_size=batch_size,
                              device=device, workers=workers, out_dir=out_dir, examples=examples)
    typer.echo(json.dumps(result) if json_out else analysis.format_summary(result))


@app.command(cls=PanelCommand, short_help="The features z = g(x) of every sample, as .npy", epilog="Example: dho features runs/r18 --data data/test --out z.npy")
def features(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `dho distill` (reads RUN_DIR/model.pt).")],
    data: Annotated[Path, typer.Option("--data", help="Dataset to run the student over: every sample, labeled or not, any class list.")],
    out: Annotated[Path, typer.Option("--out", help="Features file to write, ending in .npy: float32 (N, D); OUT.labels.npy (int64, -1 = unlabeled) and OUT.json (keys, class names, fingerprint) are written beside it.")],
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    device: Annotated[str, typer.Option(help=DEVICE)] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader worker processes decoding images.")] = 2,
) -> None:
    """Write the features z = g(x) of every sample (evaluation view, dataset order) for linear probes and plots."""
    from dho.analyze import export_features

    info = export_features(run_dir, data, out, batch_size=batch_size, device=device, workers=workers)
    typer.echo(f"wrote {info['shape'][0]} x {info['shape'][1]} features -> {out}")


@app.command("bench-inference", cls=PanelCommand, short_help="Params, FLOPs and images/s: student, SHO, teacher", epilog="Example: dho bench-inference runs/r18 --batch-sizes 1,256 --device cuda --precision bf16\n\n"
             "Example: dho bench-inference runs/vit-b16-1pct --tome-r 8 --data data/val --device cuda (Table 9: DHO beside DHO + ToMe)")
def bench_inference(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `dho distill` (reads RUN_DIR/model.pt, and the teacher cache named in RUN_DIR/config.json).")],
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Batch sizes to time, comma-separated: 1 is latency, a large batch throughput.")] = "1,256",
    device: Annotated[str, typer.Option(help=DEVICE)] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16 (autocast; fp16 on CUDA only), the same for every model.")] = "fp32",
    teacher: Annotated[bool, typer.Option("--teacher/--no-teacher", help="Also measure the teacher named in the run's labeled cache (its architecture, random weights).")] = True,
    teacher_model: Annotated[Optional[str], typer.Option("--teacher-model", help="open_clip model name or model-config JSON of the teacher, for caches whose teacher cannot be rebuilt from its name (local-dir:, a moved config file).", show_default="the cache's")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed forwards per model and batch size.")] = 5,
    iters: Annotated[int, typer.Option(help="Timed forwards per model and batch size, at least.")] = 20,
    min_seconds: Annotated[float, typer.Option("--min-seconds", help="Time each model and batch size at least this long.")] = 2.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object (per model params, gflops, gmacs, images_per_s; ratios) instead of a table.", show_default="off")] = False,
    tome_r: Annotated[Optional[int], typer.Option("--tome-r", help=TOME_HELP + " Measured as a fourth model beside the unmerged student, with its ratios to it (Table 9).", show_default="none, no ToMe model")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Labeled dataset: also score the student (and its ToMe variant) on it, top-1/top-5 of both heads and Eq. 11 as `dho evaluate` does (Table 9's accuracy).", show_default="none, no accuracy")] = None,
    workers: Annotated[int, typer.Option(help="With --data: DataLoader worker processes decoding images.")] = 2,
) -> None:
    """Parameters, FLOPs and images/s of the student, its single-head (SHO) variant and the teacher (Tables 2, 7), with --tome-r its ToMe variant and with --data their accuracy (Table 9); writes RUN_DIR/inference_cost.json."""
    from dho.inference_bench import bench_inference as bench, format_table, write_inference_cost

    try:
        sizes = [int(b) for b in batch_sizes.replace(",", " ").split()]
    except ValueError:
        sizes = []
    if not sizes:
        raise ConfigError(f"--batch-sizes takes positive integers separated by commas, e.g. --batch-sizes 1,256; got {batch_sizes!r}")
    result = bench(run_dir, batch_sizes=sizes, device=device, precision=precision, teacher=teacher,
                   teacher_model=teacher_model, warmup=warmup, iters=iters, min_seconds=min_seconds, tome_r=tome_r,
                   data=data, workers=workers)
    path = write_inference_cost(run_dir, result)
    typer.echo(json.dumps(result) if json_out else format_table(result))
    typer.echo(f"wrote {path}", err=True)


# --------------------------------------------------------------------------------------------
# stage 1: teacher cache
# --------------------------------------------------------------------------------------------


def _floats3(text: Optional[str], option: str) -> Optional[tuple[float, float, float]]:
    """'0.5,0.5,0.5' or '0.5 0.5 0.5' -> (0.5, 0.5, 0.5)."""
    if text is None:
        return None
    parts = text.replace(",", " ").split()
    try:
        values = tuple(float(x) for x in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ConfigError(f"{option} takes three numbers (R,G,B), e.g. {option} 0.485,0.456,0.406; got {text!r}")
    return values


@app.command("precompute-teacher", cls=PanelCommand, short_help="The teacher over V views of every sample, into a cache", epilog="Example: dho precompute-teacher data/train --out cache/train.zarr --views 10")
def precompute_teacher(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (manifest.json + shards).")],
    out: Annotated[Path, typer.Option("--out", help="Teacher cache to create or resume (a Zarr v3 folder, e.g. CACHE.zarr).")],
    model: Annotated[Optional[str], typer.Option(help="open_clip model name, or a path to an open_clip model-config JSON file (registered under its file stem); ignored with --pretrained local-dir:.", show_default=shown(PRECOMPUTE_DEFAULTS["model"]), rich_help_panel=TEACHER)] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Teacher weights: an open_clip tag, a local checkpoint file, local-dir:FOLDER (open_clip_config.json + weights) or none (seeded random init).", show_default=shown(PRECOMPUTE_DEFAULTS["pretrained"]), rich_help_panel=TEACHER)] = None,
    templates: Annotated[Optional[str], typer.Option(help="Prompt templates: tip-adapter (the 7 of Tip-Adapter), openai (open_clip's 80), simple ('a photo of a {}.'), coop:DATASET (the CoOp benchmark's prompt of that dataset, e.g. coop:oxford_pets) or a file with one template per line.", show_default=shown(PRECOMPUTE_DEFAULTS["templates"]), rich_help_panel=TEACHER)] = None,
    views: Annotated[Optional[int], typer.Option(help="Augmented views per sample: RandomResizedCrop(scale 0.5-1, ratio 3/4-4/3) + flip p=0.5, seeded by (seed, key, view).", show_default=shown(PRECOMPUTE_DEFAULTS["views"]), rich_help_panel=VIEWS)] = None,
    center_view: Annotated[bool, typer.Option("--center-view", help="Also store the evaluation view (open_clip's eval transform of the teacher's preprocessing: resize + center crop for shortest, whole image for squash and longest) as an extra last view.", show_default="off", rich_help_panel=VIEWS)] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the view boxes.", show_default=shown(PRECOMPUTE_DEFAULTS["seed"]), rich_help_panel=VIEWS)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images (sample-views) per teacher forward, rounded down to whole samples.", show_default=shown(PRECOMPUTE_DEFAULTS["batch_size"]), rich_help_panel=SPEED)] = None,
    text_classifier_norm: Annotated[Optional[str], typer.Option(help="Zero-shot classifier w_c: renormalize (mean of the normalised template embeddings, re-normalised: Eq. 1) | mean (not re-normalised, as the reference code's DFN teacher: logits scale with the mean's norm). Stored in the cache.", show_default=shown(PRECOMPUTE_DEFAULTS["text_classifier_norm"]), rich_help_panel=TEACHER)] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (fp16 on CUDA, as the reference code; fp32 on CPU), bf16, fp16 or fp32 (autocast; weights stay fp32).", show_default=shown(PRECOMPUTE_DEFAULTS["precision"]), rich_help_panel=SPEED)] = None,
    device: Annotated[Optional[str], typer.Option(help=DEVICE_RANKS, show_default=shown(PRECOMPUTE_DEFAULTS["device"]), rich_help_panel=SPEED)] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes decoding and cropping images (0 = in the main process).", show_default=default_workers_help().removeprefix("Default: ").rstrip("."), rich_help_panel=SPEED)] = None,
    store_embeddings: Annotated[bool, typer.Option("--store-embeddings", help="Also store the teacher's normalised image embeddings (V, N, D) float16, for feature KD.", show_default="off", rich_help_panel=TARGETS)] = False,
    topk: Annotated[Optional[int], typer.Option(help="Store only the K largest probabilities per row (indices + values) instead of dense probs; readers spread the remaining mass uniformly over the other classes.", show_default="none = dense", rich_help_panel=TARGETS)] = None,
    eta: Annotated[Optional[float], typer.Option(help="KD temperature eta of the stored softmax(cos / (zeta * eta)); distill re-tempers exactly if it uses another.", show_default=shown(PRECOMPUTE_DEFAULTS["eta"]), rich_help_panel=TARGETS)] = None,
    zeta: Annotated[Optional[float], typer.Option(help="Teacher logit scale 1/zeta: logits = cos / zeta.", show_default=shown(PRECOMPUTE_DEFAULTS["zeta"]), rich_help_panel=TARGETS)] = None,
    rank: Annotated[Optional[int], typer.Option(help="This job's index for job arrays (no torchrun); with --world-size.", show_default="none = single process or torchrun", rich_help_panel=DISTRIBUTED)] = None,
    world_size: Annotated[Optional[int], typer.Option(help="Number of jobs of a job array; groups of --shard-group shards are split round-robin.", show_default="none", rich_help_panel=DISTRIBUTED)] = None,
    shard_group: Annotated[Optional[int], typer.Option(help="Dataset shards per Zarr shard of a new cache (cache files ~ views x shards / G; one process writes a group, so a job array needs at least as many groups as jobs). Fixed when the cache is created.", show_default="auto, about 1 MiB per Zarr shard (each unit written rewrites its Zarr shard)", rich_help_panel=DISTRIBUTED)] = None,
    augment: Annotated[Optional[str], typer.Option(help="Strong augmentation of every random view, replayed by distill from the cache: randaugment:N,M (torchvision's RandAugment ops, N per view at magnitude M of 0-30), drawn per (seed, key, view) and applied after the crop at each model's resolution.", show_default="none = crop + flip only", rich_help_panel=VIEWS)] = None,
    erase: Annotated[Optional[float], typer.Option(help="Random erasing probability P per random view (torchvision RandomErasing, value 0), after --augment; replayed by distill.", show_default="none = no erasing", rich_help_panel=VIEWS)] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Record unreadable images as invalid (valid=False, NaN rows) instead of stopping with an error.", show_default="off", rich_help_panel=VIEWS)] = False,
    compile_: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the teacher's image tower (the first batches compile, then faster forwards; same math, other kernels); if compiling fails, says so in one line and runs eagerly.", show_default="on for CUDA, off on CPU", rich_help_panel=SPEED)] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Override the teacher's input size (pixels).", show_default="from the pretrained config", rich_help_panel=PREPROCESS)] = None,
    mean: Annotated[Optional[str], typer.Option(help="Override the normalisation mean, R,G,B.", show_default="from the pretrained config", rich_help_panel=PREPROCESS)] = None,
    std: Annotated[Optional[str], typer.Option(help="Override the normalisation std, R,G,B.", show_default="from the pretrained config", rich_help_panel=PREPROCESS)] = None,
    interpolation: Annotated[Optional[str], typer.Option(help="Override the resize interpolation: bicubic or bilinear.", show_default="from the pretrained config", rich_help_panel=PREPROCESS)] = None,
    resize_mode: Annotated[Optional[str], typer.Option(help="Override the evaluation resize mode (used by --center-view): squash, shortest or longest.", show_default="from the pretrained config", rich_help_panel=PREPROCESS)] = None,
) -> None:
    """Run the teacher once over V augmented views of every sample into a teacher cache (resumable, torchrun-ready)."""
    from dho.precompute_options import check_given

    given = dict(
        model=model, pretrained=pretrained, templates=templates, text_classifier_norm=text_classifier_norm, views=views,
        seed=seed, batch_size=batch_size,
        precision=precision, device=device, workers=workers, eta=eta, zeta=zeta,
        image_size=image_size, interpolation=interpolation, resize_mode=resize_mode,
        mean=_floats3(mean, "--mean"), std=_floats3(std, "--std"),
    )
    kwargs = {k: v for k, v in given.items() if v is not None}
    check_given(dataset, out, {**kwargs, "topk": topk, "shard_group": shard_group})  # names and ranges: before torch loads (seconds)
    from dho.data.augment import parse_augment

    parse_augment(augment, erase)  # a bad spec: one line, before torch loads
    from dho.precompute import precompute

    precompute(
        dataset, out, center_view=center_view, store_embeddings=store_embeddings, topk=topk,
        rank=rank, world_size=world_size, shard_group=shard_group, skip_bad=skip_bad, compile=compile_,
        augment=augment, erase=erase, **kwargs,
    )


@app.command("tip-adapter", cls=PanelCommand, short_help="Fit Tip-Adapter-F (the few-shot teacher of DHO-F)", epilog="Example: dho tip-adapter --labeled fs/lab --labeled-cache fs/lab.zarr --val fs/val --val-cache fs/val.zarr --out tip.pt")
def tip_adapter(
    labeled: Annotated[Path, typer.Option("--labeled", help="The K-shot labeled dataset (dho split --shots K).")],
    labeled_cache: Annotated[Path, typer.Option("--labeled-cache", help="Its teacher cache, made with --store-embeddings (its augmented views are Tip-Adapter's training views).")],
    val: Annotated[Path, typer.Option("--val", help="The validation split (CoOp: min(K, 4) per class of val) for the best epoch and the alpha/beta search.")],
    val_cache: Annotated[Path, typer.Option("--val-cache", help="Its teacher cache, made with --store-embeddings (and --center-view: its evaluation view is used).")],
    out: Annotated[Path, typer.Option("--out", help="Tip-Adapter-F file to write (e.g. TEACHER.pt).")],
    preset: Annotated[Optional[str], typer.Option(help="coop:NAME: the defaults of Tip-Adapter's config of that CoOp dataset (configs/NAME.yaml: initial alpha, search scales, epochs; e.g. coop:oxford_pets = alpha 1.17, scales 7,3, 20 epochs; coop:eurosat = 2, 12,10, 100). The options below override it.", show_default="none (alpha = beta = 1, scales 7,3, 20 epochs)")] = None,
    init_alpha: Annotated[Optional[float], typer.Option(help="Tip-Adapter's alpha while fine-tuning and choosing the epoch (init_alpha).", show_default="the preset's, else 1")] = None,
    init_beta: Annotated[Optional[float], typer.Option(help="Tip-Adapter's beta while fine-tuning and choosing the epoch (init_beta).", show_default="1")] = None,
    search_scale: Annotated[Optional[str], typer.Option(help="BETA,ALPHA: the alpha/beta search on --val spans 0.1 up to these (200 beta x 20 alpha steps, Tip-Adapter's search_scale).", show_default="the preset's, else 7,3")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Fine-tuning epochs (the one best on --val is kept; Tip-Adapter's code picks it on test).", show_default="the preset's, else 20")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate of the keys (eps 1e-4, cosine schedule over the whole run).", show_default="1e-3")] = None,
    epoch_views: Annotated[str, typer.Option(help="one: an epoch is Tip-Adapter's, one pass over the labeled images, each through one cached view (view e mod V in epoch e): ceil(N / batch) steps | all: every cached (image, view) each epoch (V times the steps).")] = "one",
    batch_size: Annotated[int, typer.Option(help="Labeled embeddings per fine-tuning step (Tip-Adapter's 256).")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the fine-tuning order.")] = 0,
    device: Annotated[str, typer.Option(help=DEVICE)] = "auto",
) -> None:
    """Fit Tip-Adapter-F (the few-shot teacher of DHO-F) from teacher caches; the image tower does not run."""
    from dho import tip_adapter as tip

    adapter = tip.build(labeled, labeled_cache, val, val_cache, preset=preset, init_alpha=init_alpha, init_beta=init_beta,
                        search_scale=tip.parse_search_scale(search_scale), epochs=epochs, lr=lr, epoch_views=epoch_views,
                        batch_size=batch_size, seed=seed, device=device, log=lambda m: typer.echo(m, err=True))
    path = tip.save(adapter, out)
    typer.echo(json.dumps({"out": str(path), "alpha": adapter["alpha"], "beta": adapter["beta"], "val_top1": adapter["val_top1"],
                           "settings": adapter["settings"]}))


@app.command("tip-adapter-cache", cls=PanelCommand, short_help="A Tip-Adapter-F teacher cache from a base cache", epilog="Example: dho tip-adapter-cache tip.pt --dataset fs/train --cache fs/train.zarr --out fs/train-tipf.zarr")
def tip_adapter_cache(
    adapter: Annotated[Path, typer.Argument(help="A Tip-Adapter-F file written by `dho tip-adapter`.")],
    dataset: Annotated[Path, typer.Option("--dataset", help="The dataset of --cache.")],
    cache: Annotated[Path, typer.Option("--cache", help="Its base teacher cache, with --store-embeddings.")],
    out: Annotated[Path, typer.Option("--out", help="The Tip-Adapter-F teacher cache to create or resume (same views as --cache).")],
    device: Annotated[str, typer.Option(help=DEVICE)] = "auto",
) -> None:
    """Write a teacher cache of Tip-Adapter-F for a dataset from its base cache's embeddings (for `dho distill`)."""
    from dho import tip_adapter as tip

    result = tip.apply(adapter, dataset, cache, out, device=device, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"wrote {result.path} ({int(result.done.sum())} units)")


@app.command("merge-caches", cls=PanelCommand, short_help="Several teachers' caches of one dataset -> one ensemble cache", epilog="Example: dho merge-caches cache/vit-b16.zarr cache/vit-l14.zarr --out cache/ens.zarr (then dho distill --teacher mean | vit-l14)")
def merge_caches(
    caches: Annotated[list[Path], typer.Argument(help="Two or more complete dense teacher caches of one dataset, made with the same views (--views, --center-view, --seed), --eta, --zeta and templates.")],
    out: Annotated[Path, typer.Option("--out", help="The ensemble cache to create (must not exist); built hidden beside it and renamed into place when complete.")],
    names: Annotated[Optional[str], typer.Option("--names", help="The teachers' names, comma-separated, one per cache in order (what `dho distill --teacher NAME` selects).", show_default="the cache folders' names without .zarr")] = None,
) -> None:
    """One cache holding each teacher's probabilities (and embeddings when every cache has them) and their mean."""
    from dho.ensemble import merge_caches as merge

    ens = merge(caches, out, names=None if names is None else [n.strip() for n in names.split(",")],
                log=lambda m: typer.echo(m, err=True))
    typer.echo(f"wrote {ens.path}: the mean of {', '.join(ens.teacher_names)} ({ens.num_views} views, {ens.num_samples} samples)")


@app.command("cache-info", cls=PanelCommand, short_help="Teacher, views, coverage and size of a teacher cache", epilog="Example: dho cache-info cache/train.zarr --verify")
def cache_info(
    cache: Annotated[Path, typer.Argument(help="Teacher cache folder (CACHE.zarr).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.", show_default="off")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Read every chunk of every array (keys, labels, valid, done, text_classifier) and of every finished unit: checksums, missing chunks, and that every row is a distribution / a crop box; exit 2 if any is damaged.", show_default="off")] = False,
) -> None:
    """Teacher, views, coverage (done units, valid samples), size on disk and teacher/label top-1 agreement."""
    from dho.cache import TeacherCache
    from dho.cache_info import format_summary, summarize
    from dho.errors import CacheError

    info = summarize(cache)
    if verify:
        tc = TeacherCache.open(cache)
        arrays = tc.verify_arrays()
        units = [] if any("array 'valid'" in p for p in arrays) else tc.verify_units()  # each unit read checks `valid`
        problems = arrays + units
        info["verified"] = {"damaged_arrays": len(arrays), "damaged_units": len(units), "problems": problems}
    typer.echo(json.dumps(info) if json_out else format_summary(info))
    if verify and problems:
        what = ", ".join(f"{n} damaged {w}(s)" for n, w in ((len(arrays), "array"), (len(units), "unit")) if n)
        raise CacheError(f"{cache}: {what}, the first: {problems[0]}")


# other tools' names of dho's options (folded: lower case, no '-' or '_'): `--learning-rate` -> "did you mean --lr?"
OPTION_SYNONYMS = {
    "learningrate": "--lr", "wd": "--weight-decay", "bs": "--batch-size", "batch": "--batch-size",
    "numworkers": "--workers", "nworkers": "--workers", "numepochs": "--epochs", "nepochs": "--epochs",
    "output": "--out", "outdir": "--out", "outputdir": "--out", "o": "--out", "model": "--student",
    "arch": "--student", "teacher": "--model", "temperature": "--eta", "kdtemperature": "--eta", "lam": "--lambda",
    "resumefrom": "--resume", "valdata": "--val", "validation": "--val", "warmup": "--warmup-steps",
    "numviews": "--views", "amp": "--precision", "dtype": "--precision", "gpus": "--device", "labeleddata": "--labeled",
}


def usage_message(e: Exception) -> str:
    """click's message of a usage error; for an unknown option that is another tool's name of one of the command's
    options (OPTION_SYNONYMS), that option instead of click's close spellings."""
    name, ctx = getattr(e, "option_name", None), getattr(e, "ctx", None)
    if type(e).__name__ == "NoSuchOption" and name and ctx is not None:
        target = OPTION_SYNONYMS.get(name.lstrip("-").replace("-", "").replace("_", "").lower())
        if target in {opt for param in ctx.command.params for opt in getattr(param, "opts", [])}:
            return f"No such option: {name} (did you mean {target}?)"
    return e.format_message()


def one_line(e: BaseException) -> str:
    """The user-facing line of an error; an error raised in a DataLoader worker arrives wrapped in a
    worker traceback, of which only its own last line is the message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        prefix = f"{type(e).__module__}.{type(e).__name__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last
    return " ".join(text.split())


def main() -> None:
    """Console-script entry point: every error a user can fix prints one line (`error: ...`), never a traceback.

    Exit status: 0 done, 2 a problem with the input, options or environment (the line says which),
    3 interrupted by SIGTERM/SIGINT/SIGUSR1 after saving what can be resumed, 130 interrupted elsewhere.
    """
    import errno

    import click

    from dho.errors import DhoError, Interrupted

    # typer >= 0.2x vendors click (typer._click); older typer raises click's own classes: catch both
    usage_errors: tuple = (click.ClickException,)
    aborts: tuple = (click.Abort, typer.Abort, KeyboardInterrupt)
    try:
        from typer._click.exceptions import ClickException as VendoredClickException

        usage_errors += (VendoredClickException,)
    except ImportError:
        pass

    try:
        code = app(standalone_mode=False, prog_name="dho")
        sys.exit(code or 0)
    except usage_errors as e:  # unknown options, bad types, missing arguments
        if type(e).__name__ == "NoArgsIsHelpError":  # `dho` alone: the help, as click prints it
            typer.echo(e.format_message(), err=True)
            sys.exit(2)
        name = e.ctx.command_path if getattr(e, "ctx", None) is not None else "dho"
        fail(f"{one_line(Exception(usage_message(e)))} (see `{name} --help`)")
    except Interrupted as e:
        fail(one_line(e), code=Interrupted.EXIT_CODE)
    except DhoError as e:
        fail(one_line(e))
    except aborts:
        fail("interrupted", code=130)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            where = e.filename or "the output"
            fail(f"cannot write {where}: {e.strerror}; free disk space or choose a writable output folder")
        raise


if __name__ == "__main__":
    main()
