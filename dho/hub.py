"""Hugging Face-style model folders of a finished run, and the safetensors weights dho writes.

    dho export RUN --format hf --out DIR

    DIR/config.json         what rebuilds the student (build_args: architecture, number of classes, head form, the
                            open_clip model config of VLM students), class names (also as id2label / label2id),
                            Eq. 11's alpha and beta, the preprocessing (dho's record, and timm's pretrained_cfg keys:
                            input_size, interpolation, mean, std, crop_pct, crop_mode), the teacher, the data's
                            fingerprints, the run's validation numbers, its config and the command that made it
    DIR/model.safetensors   the student's state_dict (backbone.*, ce_head.*, kd_head.*), metadata as export's
    DIR/README.md           a model card: YAML front matter (library_name, tags, license, pipeline_tag), then the
                            same facts in words and how to load the folder

The folder loads with `dho.load_run(DIR)` (or `dho.load_export(DIR)`), and without dho's loader by plain
safetensors: `safetensors.torch.load_file(DIR/model.safetensors)` loads with strict=True into
`dho.students.rebuild_student(config["build_args"], Preprocessing.from_dict(config["preprocess"]))`.
`huggingface_hub.upload_folder(repo_id=..., folder_path=DIR)` publishes it as it is.

The folder is built beside DIR under a temporary name and renamed into place, so it is whole or absent. DIR may be
new, empty, or a folder an earlier `dho export --format hf` wrote (nothing else in it): it is replaced. Any other
folder is refused; nothing of the user's is overwritten.

Out of scope: a `transformers` AutoModel class (the student is not a transformers model), uploading (no network
here), model cards in other languages, and licences: the card says `license: unknown`, to be set by whoever
publishes (the teacher's and the data's licences bind the student).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Optional, Union

import torch

import dho
from dho.atomic import replace_folders
from dho.data import file_sha256
from dho.data.views import Preprocessing
from dho.errors import ConfigError
from dho.run_dir import BEST_JSON, MODEL, RunDir

HF_FORMAT = "dho-hf"  # config.json's "format": a folder written by `dho export --format hf`
HF_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
WEIGHTS_FORMAT = "dho-student"  # the safetensors metadata's "format" (export's OUT.safetensors and the folder's)
# open_clip's resize modes as timm's crop_mode: short side + center crop, squash, long side + pad
CROP_MODES = {"shortest": "center", "squash": "squash", "longest": "border"}
OUTPUT = "float32 probabilities (B, C) = alpha * softmax(ce_head) + (1 - alpha) * softmax(kd_head / beta)  (Eq. 11)"
# `dho distill` flags whose names are not the config key's (RUN/config.json keeps the Python names)
FLAGS = {"lambda_": "--lambda", "init_heads_from_text": "--text-init"}
NEGATABLE = {"init_heads_from_text", "align_kd_head", "compile"}  # bool flags with a --no- form


# --------------------------------------------------------------------------------------------
# safetensors weights: written by export (OUT.safetensors) and in the folder (model.safetensors)
# --------------------------------------------------------------------------------------------


def write_weights(student, path: Path, meta: dict, alpha: float, beta: float) -> None:
    """The student's state_dict as safetensors; everything needed to use it as strings in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()}  # clone: no shared storage
    save_file(tensors, str(path), metadata={
        "format": WEIGHTS_FORMAT, "dho_version": dho.__version__, "alpha": repr(float(alpha)), "beta": repr(float(beta)),
        "classnames": json.dumps(meta["classnames"]), "preprocess": json.dumps(meta["preprocess"].to_dict()),
        "build_args": json.dumps(meta["build_args"]),
    })


def read_weights_metadata(path: Path) -> dict:
    """The metadata of a dho safetensors file as values: {alpha, beta, classnames, preprocess, build_args, dho_version}."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # not a safetensors file, truncated
        raise ConfigError(f"cannot read {path} as safetensors ({type(e).__name__}: {str(e)[:200]})") from e
    if raw.get("format") != WEIGHTS_FORMAT:
        raise ConfigError(f"{path} is a safetensors file but not a dho student's (its metadata has no format "
                          f"{WEIGHTS_FORMAT}); give the weights `dho export` wrote")
    try:
        return {"alpha": float(raw["alpha"]), "beta": float(raw["beta"]), "classnames": json.loads(raw["classnames"]),
                "preprocess": json.loads(raw["preprocess"]), "build_args": json.loads(raw["build_args"]),
                "dho_version": raw.get("dho_version")}
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{path}: the dho metadata is incomplete ({type(e).__name__}: {e}); export the run again") from e


def load_weights(path: Path, build_args: dict, preprocess: dict, device: Union[str, torch.device] = "cpu"):
    """The student rebuilt from `build_args` and `preprocess` (offline, no download) with the tensors of the
    safetensors file `path` loaded strictly, in eval mode on `device`."""
    from safetensors.torch import load_file

    from dho.students import rebuild_student

    student = rebuild_student(build_args, Preprocessing.from_dict(preprocess))
    try:
        student.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:  # missing / unexpected keys, other shapes
        first = str(e).strip().splitlines()[0][:300]
        raise ConfigError(f"{path}: the tensors do not fit the student its metadata describes ({first}); export the run again") from e
    return student.to(device).eval()


# --------------------------------------------------------------------------------------------
# the folder
# --------------------------------------------------------------------------------------------


def is_hf_folder(path: Union[str, Path]) -> bool:
    """Whether `path` is a folder `dho export --format hf` wrote (its config.json says so)."""
    return _read_config(Path(path)) is not None


def _read_config(folder: Path) -> Optional[dict]:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("format") == HF_FORMAT else None


def read_folder(folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> tuple[object, dict]:
    """The student of a dho hf folder (strictly loaded, eval mode, on `device`) and its config.json."""
    folder = Path(folder)
    config = _read_config(folder)
    if config is None:
        raise ConfigError(f"{folder} is not a dho model folder (no {CONFIG_FILE} of format {HF_FORMAT}); "
                          "write one with `dho export RUN --format hf --out DIR`")
    if config.get("version") != HF_VERSION:
        raise ConfigError(f"{folder / CONFIG_FILE} has version {config.get('version')}; this dho reads version {HF_VERSION}")
    weights = folder / config.get("files", {}).get("weights", WEIGHTS_FILE)
    if not weights.is_file():
        raise ConfigError(f"{weights} not found: the folder is incomplete; export the run again")
    return load_weights(weights, config["build_args"], config["preprocess"], device), config


def _check_out(out: Path) -> None:
    """DIR must be new, empty or an earlier dho hf export with nothing else in it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; --format hf writes a folder (config.json, model.safetensors, README.md)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if _read_config(out) is None:
        raise ConfigError(f"--out {out} is a folder with files but not a dho hf export (no {CONFIG_FILE} of format "
                          f"{HF_FORMAT}); it is left alone: choose a new or empty folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in FILES)
    if foreign:
        raise ConfigError(f"--out {out} holds files a dho hf export does not write ({', '.join(foreign[:5])}"
                          f"{' ...' if len(foreign) > 5 else ''}); move them away first, dho never deletes them")


def write_folder(run_dir: Union[str, Path], out: Union[str, Path], weights: Optional[str] = None) -> Path:
    """RUN_DIR's finished student (`weights` ema | raw of a --ema run, `dho.students.load_student`) as a Hugging
    Face-style folder `out` (see the module docstring) -> out."""
    from dho.evaluate import load_run, run_alpha_beta

    run_dir, out = Path(run_dir), Path(out)
    _check_out(out)
    student, meta = load_run(run_dir, "cpu", weights)
    alpha, beta, source = run_alpha_beta(run_dir, meta)
    run = RunDir(run_dir)
    run_config = run.read_config() if run.config.is_file() else None
    config = folder_config(run, student, meta, alpha, beta, source, run_config, out)
    with replace_folders(out) as (tmp,):
        write_weights(student, tmp / WEIGHTS_FILE, meta, alpha, beta)
        _verify(tmp / WEIGHTS_FILE, student, meta)
        config["sha256"] = {WEIGHTS_FILE: file_sha256(tmp / WEIGHTS_FILE)}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD_FILE).write_text(model_card(config))
    return out


@torch.no_grad()
def _verify(weights: Path, student, meta: dict) -> None:
    """The written weights, rebuilt as a reader rebuilds them, give the student's logits exactly."""
    again = load_weights(weights, meta["build_args"], meta["preprocess"].to_dict())
    size = meta["preprocess"].image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # (2, 3, S, S)
    a, b = student(x), again(x)
    if not all(torch.equal(a[k], b[k]) for k in ("ce_logits", "kd_logits")):
        raise ConfigError(f"the student rebuilt from {weights.name} predicts otherwise than {MODEL}; please report this")


def folder_config(run: RunDir, student, meta: dict, alpha: float, beta: float, source: str,
                  run_config: Optional[dict], out: Path) -> dict:
    """config.json of the folder: build args, classes, Eq. 11, preprocessing, provenance."""
    pre: Preprocessing = meta["preprocess"]
    classnames = list(meta["classnames"])
    build = meta["build_args"]
    return {
        "format": HF_FORMAT, "version": HF_VERSION, "library_name": "dho", "dho_version": dho.__version__,
        "torch_version": torch.__version__,
        "architecture": f"dho.students.DualHeadStudent({build['name']})", "student": build["name"],
        "num_classes": len(classnames), "num_features": int(student.feature_dim),
        "build_args": build,
        "classnames": classnames, "label_names": classnames,
        "id2label": {str(i): n for i, n in enumerate(classnames)}, "label2id": {n: i for i, n in enumerate(classnames)},
        "alpha": float(alpha), "beta": float(beta), "alpha_beta_source": source, "output": OUTPUT,
        "preprocess": pre.to_dict(),
        "pretrained_cfg": {  # timm's names for the same evaluation view
            "input_size": [3, pre.image_size, pre.image_size], "interpolation": pre.interpolation,
            "mean": list(pre.mean), "std": list(pre.std), "crop_pct": 1.0, "crop_mode": CROP_MODES.get(pre.resize_mode),
        },
        "method": (meta.get("extra") or {}).get("method"),
        "teacher": _teacher(run_config),
        "data": _data(run_config),
        "validation": _validation(run, run_config),
        "distill_config": run_config,
        "commands": {"distill": distill_command(run_config) if run_config else None,
                     "export": f"dho export {shlex.quote(str(run.path))} --format hf --out {shlex.quote(str(out))}"},
        "files": {"weights": WEIGHTS_FILE, "card": CARD_FILE},
    }


def _cache_attrs(path: Optional[str]) -> Optional[dict]:
    """The attributes of the teacher cache at `path`, or None where it is not there (any more)."""
    if not path:
        return None
    from dho.cache import TeacherCache

    try:
        return TeacherCache.open(path).attrs
    except Exception:  # moved, deleted, unreadable: the card says so
        return None


def _teacher(run_config: Optional[dict]) -> Optional[dict]:
    """The teacher of the run's labeled cache: {model, pretrained, weights_sha256, ...} and its templates' count."""
    attrs = _cache_attrs((run_config or {}).get("labeled_cache"))
    if attrs is None:
        return None
    return {**dict(attrs["teacher"]), "num_templates": len(attrs.get("templates") or []),
            "num_views": attrs.get("num_views"), "eta": attrs.get("eta"), "precision": attrs.get("precision")}


def _data(run_config: Optional[dict]) -> dict:
    """{labeled, unlabeled, val}: each {dataset, cache, fingerprint, num_samples}; fingerprints from the caches
    (which were checked against the datasets at training time), else from the datasets' manifests."""
    from dho.data import Dataset

    out = {}
    cfg = run_config or {}
    for role, ds_key, cache_key in (("labeled", "labeled", "labeled_cache"), ("unlabeled", "unlabeled", "unlabeled_cache"),
                                    ("val", "val", None)):
        dataset, cache = cfg.get(ds_key), cfg.get(cache_key) if cache_key else None
        if dataset is None and cache is None:
            continue
        record = {"dataset": dataset, "cache": cache, "fingerprint": None, "num_samples": None}
        attrs = _cache_attrs(cache)
        if attrs is not None:
            record.update(fingerprint=attrs["dataset_fingerprint"], num_samples=attrs["num_samples"])
        elif dataset is not None:
            try:
                ds = Dataset.open(dataset)
                record.update(fingerprint=ds.fingerprint, num_samples=ds.num_samples)
            except Exception:  # moved or deleted since training
                pass
        out[role] = record
    return out


def _validation(run: RunDir, run_config: Optional[dict]) -> dict:
    """The run's validation numbers: the final --val record of metrics.jsonl, the best epoch of
    --select-best-on-val, and the alpha/beta search of `dho evaluate --search-on`."""
    out = {}
    if run.metrics.is_file():
        finals = [r for r in map(_json_line, run.metrics.read_text().splitlines()) if r and r.get("final")]
        if finals:
            out["final"] = {"data": (run_config or {}).get("val"),
                            **{k: v for k, v in finals[-1].items() if k.startswith("val_") or k == "step"}}
    best = run.best / BEST_JSON
    if best.is_file():
        out["best_epoch"] = json.loads(best.read_text())
    stored = run.read_alpha_beta()
    if stored is not None:
        out["alpha_beta_search"] = {k: stored.get(k) for k in ("search_on", "search_on_fingerprint", "num_samples",
                                                               "best_top1", "alpha", "beta", "beta_grid_name")}
    return out


def _json_line(line: str) -> Optional[dict]:
    try:
        record = json.loads(line)
    except ValueError:  # a line cut by a kill
        return None
    return record if isinstance(record, dict) else None


def distill_command(run_config: dict) -> str:
    """The `dho distill` command equivalent to the run's config.json: the required options and those that differ
    from the defaults, as flags, in DistillConfig's order."""
    from dho.distill.config import DistillConfig

    fields = dataclasses.fields(DistillConfig)
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    order = [f.name for f in fields if f.name in run_config] + sorted(set(run_config) - {f.name for f in fields})
    parts = ["dho", "distill"]
    for key in order:
        value = run_config[key]
        if key in defaults and value == defaults[key]:
            continue
        flag = FLAGS.get(key, "--" + key.replace("_", "-"))
        if isinstance(value, bool):
            if value:
                parts.append(flag)
            elif key in NEGATABLE:
                parts.append("--no-" + flag[2:])
            continue
        parts += [flag, shlex.quote(str(value)) if value is not None else "none"]
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# the model card
# --------------------------------------------------------------------------------------------


def _pct(v) -> str:
    return "-" if v is None else f"{float(v):.2f}"


def model_card(config: dict) -> str:
    """README.md of the folder: YAML front matter a Hugging Face repository reads, then the facts of config.json."""
    student, teacher = config["student"], config.get("teacher")
    tags = ["dho", "image-classification", "knowledge-distillation", "dual-head-optimization",
            "timm" if config["build_args"].get("kind") == "timm" else config["build_args"].get("kind")]
    front = ["---", "library_name: dho", "license: unknown", "pipeline_tag: image-classification", "tags:",
             *[f"- {t}" for t in dict.fromkeys(t for t in tags if t)], "---", ""]
    pre, names = config["preprocess"], config["classnames"]
    shown = ", ".join(f"`{n}`" for n in names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
    method = config.get("method") or "unknown"
    lines = [
        f"# {student}, distilled by dho ({config['num_classes']} classes)", "",
        f"A `{student}` student with two heads (ce_head, kd_head) on one feature extractor, distilled from a "
        f"vision-language teacher by dho {config['dho_version']} (method `{method}`; `dho` is Dual-Head "
        "Optimization, Kang et al.). It predicts", "",
        "    p = alpha * softmax(ce_head(z)) + (1 - alpha) * softmax(kd_head(z) / beta)    (Eq. 11)", "",
        f"with alpha = {config['alpha']:g}, beta = {config['beta']:g} ({config['alpha_beta_source']}).", "",
    ]
    build = config["build_args"]
    if "ce_head" in build:  # an mlp head (§E.2); two linear heads record no forms
        lines += [f"Heads: ce_head {build['ce_head']}, kd_head {build['kd_head']} (mlp: Linear -> LayerNorm -> GELU -> "
                  f"Dropout({build['head_dropout']:g}) -> Linear, hidden width {build['head_hidden']}).", ""]
    lines += [
        "## Teacher", "",
    ]
    if teacher:
        lines += [f"- model: `{teacher.get('model')}`, pretrained: `{teacher.get('pretrained')}`",
                  f"- weights sha256: `{teacher.get('weights_sha256')}`",
                  f"- {teacher.get('num_templates')} prompt template(s), {teacher.get('num_views')} cached view(s) per "
                  f"image, eta = {teacher.get('eta')}, precision {teacher.get('precision')}", ""]
    else:
        lines += ["Not recorded: the run's teacher cache was not found when the folder was written.", ""]
    lines += ["## Data", "", "| role | dataset | samples | fingerprint (sha256) |", "|---|---|---|---|"]
    for role, d in config["data"].items():
        lines.append(f"| {role} | `{d.get('dataset')}` | {d.get('num_samples') if d.get('num_samples') is not None else '-'} "
                     f"| `{d.get('fingerprint') or 'not found'}` |")
    if not config["data"]:
        lines.append("| - | not recorded in the run's config.json | - | - |")
    lines += ["", "## Validation", ""]
    val = config["validation"]
    if "final" in val:
        f = val["final"]
        lines += [f"On `{f.get('data')}` at the end of training (top-1 %): ce_head {_pct(f.get('val_ce_head_top1'))}, "
                  f"kd_head {_pct(f.get('val_kd_head_top1'))}, combined {_pct(f.get('val_combined_top1'))}.", ""]
    if "best_epoch" in val:
        b = val["best_epoch"]
        lines += [f"Best epoch on `{b.get('val')}`: epoch {b.get('epoch')}, top-1 {_pct(b.get('top1'))}.", ""]
    if "alpha_beta_search" in val:
        s = val["alpha_beta_search"]
        lines += [f"alpha, beta searched on `{s.get('search_on')}` ({s.get('num_samples')} images): top-1 "
                  f"{_pct(s.get('best_top1'))} at alpha = {s.get('alpha')}, beta = {s.get('beta')}.", ""]
    if not val:
        lines += ["None recorded (the run had no --val and no `dho evaluate --search-on`).", ""]
    lines += ["## Classes", "", shown, "",
              "## Preprocessing", "",
              f"RGB, {pre['resize_mode']} resize to {pre['image_size']} px ({pre['interpolation']}), "
              + ("then a center crop" if pre["resize_mode"] == "shortest" else "no crop")
              + f", x / 255, mean {pre['mean']}, std {pre['std']}.", "",
              "## Use", "", "```python", "import dho", "", 'model = dho.load_run("path/to/this/folder")',
              'print(model.predict(["image.jpg"]).top(5))', "```", "",
              "Without dho's loader (plain safetensors; the architecture from config.json):", "",
              "```python", "import json", "from safetensors.torch import load_file",
              "from dho.data import Preprocessing", "from dho.students import rebuild_student", "",
              'config = json.load(open("config.json"))',
              'student = rebuild_student(config["build_args"], Preprocessing.from_dict(config["preprocess"]))',
              f'student.load_state_dict(load_file("{WEIGHTS_FILE}"), strict=True)',
              "```", "",
              "## How it was made", ""]
    commands = config["commands"]
    if commands.get("distill"):
        lines += ["The run (the command equivalent to its config.json):", "", "```bash", commands["distill"], "```", ""]
    lines += ["This folder:", "", "```bash", commands["export"], "```", ""]
    return "\n".join(front + lines)

