"""Turn a recipe's sections into `dho` options, so the YAML file is the one source of truth.

    # run a command with a section appended as options (keys = option names, '_' for '-')
    python pipelines/lowshot/recipe.py run pipelines/lowshot/vit-b16.yaml precompute [KEY=VALUE ...] \
        -- dho precompute-teacher runs/lowshot/data/train --out runs/lowshot/cache/train.zarr
    # print one value of a section (empty if absent; a list as space-separated words)
    python pipelines/lowshot/recipe.py get pipelines/fewshot/resnet18-scratch.yaml recipe dho_f_alpha
    # write a section as a plain YAML mapping, e.g. for `dho distill --config FILE`; --variant NAME first applies
    # the overrides of `recipe.variants.NAME` (e.g. Table 14's non-linear heads: nl-head-kd -> kd_head: mlp)
    python pipelines/lowshot/recipe.py config pipelines/lowshot/vit-b16.yaml distill --out distill.yaml [--variant NAME]
    # --row NAME: the same with `recipe.rows.NAME.overrides` (Table 13's rows, frozen-clip-l14.yaml)
    python pipelines/lowshot/recipe.py config pipelines/lowshot/frozen-clip-l14.yaml distill --row vpt3-dho --out vpt3-dho.yaml
    # `dho split` options of a split of `recipe.splits` (e.g. `--shots 16 --sampler coop --seed 1`)
    python pipelines/lowshot/recipe.py split-options pipelines/lowshot/frozen-clip-l14.yaml 16shot
    # teacher views a labeled split's cache needs so that no labeled (sample, view) is drawn more than
    # the recipe's `max_labeled_reuse` times over the distill schedule (prints one integer); pool-views
    # the same for the unlabeled pool's cache
    python pipelines/lowshot/recipe.py labeled-views pipelines/lowshot/vit-b16.yaml \
        --labeled runs/lowshot/data/train-1pct --pool runs/lowshot/data/train

A recipe (see pipelines/README.md) has the sections `recipe` (what it is, splits), `precompute`
(options of `dho precompute-teacher`), `distill` (DistillConfig fields, read by `dho distill
--config`), `evaluate` (options of `dho evaluate`) and `expected` (the paper's numbers).
`KEY=VALUE` overrides a key of the section for this call (VALUE is read as YAML; an empty VALUE
drops the key): the Makefile uses it for what depends on the machine or the dataset, e.g.
`pretrained=/models/dfn5b.bin` or `views=1 center_view=true` for the validation cache.

Option rendering: `key: value` -> `--key value`; `true` -> `--key` (flag options), `false` and
null -> left out; a list -> `--key a,b,c` (e.g. mean/std). `run` prints the full command to
stderr, then replaces itself with it (same exit status).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import yaml

SECTIONS = ("recipe", "precompute", "distill", "evaluate", "expected")


def load_recipe(path: Path) -> dict:
    """The recipe mapping; every top-level key must be a known section."""
    if not path.is_file():
        sys.exit(f"error: recipe {path} not found")
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(recipe, dict):
        sys.exit(f"error: {path} is not a YAML mapping of sections {SECTIONS}")
    unknown = sorted(set(recipe) - set(SECTIONS))
    if unknown:
        sys.exit(f"error: {path}: unknown sections {unknown}; known: {list(SECTIONS)}")
    return recipe


def section(path: Path, name: str, overrides: list[str] = ()) -> dict:
    """Section `name` of the recipe at `path`, with `KEY=VALUE` overrides applied."""
    recipe = load_recipe(path)
    if not isinstance(recipe.get(name), dict):
        sys.exit(f"error: {path} has no `{name}:` section (a mapping)")
    values = dict(recipe[name])
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            sys.exit(f"error: override {item!r} is not KEY=VALUE")
        if raw == "":
            values.pop(key, None)
        else:
            values[key] = yaml.safe_load(raw)
    return values


def to_options(values: dict) -> list[str]:
    """`{"views": 10, "center_view": True, "mean": [0.5, 0.5, 0.5]}` -> `--views 10 --center-view --mean 0.5,0.5,0.5`."""
    options: list[str] = []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            options.append(flag)
        elif isinstance(value, (list, tuple)):
            options += [flag, ",".join(str(v) for v in value)]
        else:
            options += [flag, str(value)]
    return options


def stream_views(path: Path, labeled: Path, pool: Path, stream: str = "labeled") -> int:
    """Views for the cache of one stream: the distill section's schedule (dho.distill's own arithmetic) over
    these datasets, so that each (sample, view) of the `labeled` or `unlabeled` stream is drawn at most
    `recipe.max_labeled_reuse` times (the recipe's one reuse bound, for both streams)."""
    import json

    from dho.distill import DistillConfig, schedule_steps, views_needed

    recipe = load_recipe(path)
    max_reuse = recipe.get("recipe", {}).get("max_labeled_reuse")
    if not isinstance(max_reuse, (int, float)) or max_reuse <= 0:
        sys.exit(f"error: {path}: `recipe: max_labeled_reuse:` must be a positive number")
    defaults = {f: getattr(DistillConfig, f) for f in ("epochs", "batch_size", "lr_schedule", "unlabeled_pool", "epoch")}
    cfg = {**defaults, **{k: v for k, v in recipe["distill"].items() if k in defaults}}
    sizes = {}
    for name, folder in (("labeled", labeled), ("pool", pool)):
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            sys.exit(f"error: {manifest} not found: make the {name} dataset first")
        sizes[name] = json.loads(manifest.read_text())["num_samples"]
    # the unlabeled stream: the pool without the labeled samples, or labeled ∪ pool (labeled ⊂ pool here)
    unlabeled = sizes["pool"] - sizes["labeled"] if cfg["unlabeled_pool"] == "exclude-labeled" else sizes["pool"]
    epoch_size = min(unlabeled, sizes["labeled"]) if cfg["epoch"] == "shorter" else unlabeled
    _, total = schedule_steps(epoch_size, cfg["batch_size"], cfg["epochs"], cfg["lr_schedule"])
    return views_needed(total, cfg["batch_size"], sizes["labeled"] if stream == "labeled" else unlabeled, max_reuse)


def _yaml_value(value) -> str:
    """A value as the YAML text of a KEY=VALUE override (read back by `section`)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def main() -> None:
    argv = sys.argv[1:]
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run `-- COMMAND ...` with the section appended as options")
    config = sub.add_parser("config", help="write the section as a YAML mapping")
    get = sub.add_parser("get", help="print one value of a section (nothing if the key is absent)")
    get.add_argument("recipe", type=Path)
    get.add_argument("section", choices=SECTIONS)
    get.add_argument("key")
    views = sub.add_parser("labeled-views", help="print the teacher views a labeled split's cache needs")
    pool_views = sub.add_parser("pool-views", help="print the teacher views the unlabeled pool's cache needs")
    for v in (views, pool_views):
        v.add_argument("recipe", type=Path)
        v.add_argument("--labeled", type=Path, required=True, help="the labeled dataset (made by `dho split`)")
        v.add_argument("--pool", type=Path, required=True, help="the unlabeled pool dataset it was split from")
    for p in (run, config):
        p.add_argument("recipe", type=Path)
        p.add_argument("section", choices=SECTIONS)
        p.add_argument("overrides", nargs="*", help="KEY=VALUE (VALUE read as YAML; empty drops KEY)")
    config.add_argument("--out", type=Path, required=True)
    config.add_argument("--variant", default=None, help="apply recipe.variants.NAME's keys before the overrides")
    config.add_argument("--row", default=None, help="apply recipe.rows.NAME.overrides before the overrides")
    split = sub.add_parser("split-options", help="print the `dho split` options of a split of recipe.splits")
    split.add_argument("recipe", type=Path)
    split.add_argument("split")
    args = parser.parse_args(argv)
    if args.action == "split-options":
        splits = load_recipe(args.recipe).get("recipe", {}).get("splits") or {}
        if args.split not in splits:
            sys.exit(f"error: {args.recipe} has no split {args.split!r}; its recipe.splits: {', '.join(splits) or 'none'}")
        print(shlex.join(to_options(splits[args.split])))
        return
    if args.action == "get":
        value = section(args.recipe, args.section).get(args.key)
        print("" if value is None else " ".join(map(str, value)) if isinstance(value, list) else value)
        return
    if args.action in ("labeled-views", "pool-views"):
        print(stream_views(args.recipe, args.labeled, args.pool, "labeled" if args.action == "labeled-views" else "unlabeled"))
        return

    overrides = list(args.overrides)
    if getattr(args, "row", None):
        rows = load_recipe(args.recipe).get("recipe", {}).get("rows") or {}
        if args.row not in rows:
            sys.exit(f"error: {args.recipe} has no row {args.row!r}; its recipe.rows: {', '.join(rows) or 'none'}")
        overrides = [f"{k}={_yaml_value(v)}" for k, v in (rows[args.row].get("overrides") or {}).items()] + overrides
    if getattr(args, "variant", None):
        variants = load_recipe(args.recipe).get("recipe", {}).get("variants") or {}
        if args.variant not in variants:
            sys.exit(f"error: {args.recipe} has no variant {args.variant!r}; its recipe.variants: {', '.join(variants) or 'none'}")
        overrides = [f"{k}={_yaml_value(v)}" for k, v in variants[args.variant].items()] + overrides
    values = section(args.recipe, args.section, overrides)
    if args.action == "config":
        if command:
            sys.exit("error: `config` takes no `-- COMMAND`")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(f"# `{args.section}` of {args.recipe}\n" + yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
        os.replace(tmp, args.out)
        return
    if not command:
        sys.exit("error: `run` needs `-- COMMAND ...` after the recipe arguments")
    full = command + to_options(values)
    print("+ " + shlex.join(full), file=sys.stderr, flush=True)
    os.execvp(full[0], full)


if __name__ == "__main__":
    main()
