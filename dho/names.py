"""What the command line knows before torch is imported: the paper's temperatures, the names of the
methods, students and teachers dho builds, and close-match suggestions for a misspelled name.

Importing torch takes seconds (about 9 s on a busy 2-core box), so `dho --help` renders its defaults from
here and `dho distill` / `dho precompute-teacher` refuse an unknown name from here, before torch is
imported (`dho/distill/precheck.py`). The modules that build things import these names from here
(`dho.losses`, `dho.students`, `dho.teacher`, `dho.distill.objective`); tests keep them equal.
open_clip's model names are the stems of the JSON files of its `model_configs` folder, listed from the
installed package's files without importing it (its import loads torch).

Out of scope: timm's model names (listing them imports timm and torch: the builder checks them).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Iterable, Optional

from dho.errors import ConfigError, did_you_mean

ZETA = 0.01  # ζ: logit scale 1/ζ = 100 of the teacher (Eq. 1, as CLIP and the reference code) and of the aligned kd_head (Eq. 10)
ETA = 2.0  # η: the KD temperature (Alg. 1 lines 13, 19)

METHODS = ("dho", "ce", "kd", "ce+kd", "ce+kd-feature", "sskd", "dhkd")  # the records of dho/distill/objective.py, in their order
SURGERY_METHODS = ("dho", "ce+kd", "ce+kd-feature", "sskd", "dhkd")  # the records with two loss terms (Objective.tasks): --grad-surgery's
GRAD_SURGERIES = ("none", "pcgrad")  # --grad-surgery: none, or PCGrad between the two terms (dho/distill/surgery.py)
# baselines of the recipes that are a method with options (`recipe.baselines`, the Makefile's FS_BASELINE_FLAGS_NAME)
BASELINE_VARIANTS = {"ce+kd+pcgrad": ("--method", "ce+kd", "--grad-surgery", "pcgrad")}  # the authors' train_imgnet_pc_grad.py
VLM_HEADS = ("reference", "eq10")  # the aligned kd_head / text init of VLM students (see dho/students.py)
TEXT_INIT_HEADS = ("both", "ce", "kd")  # which heads the language-aware init sets (Table 5: per head)
HEAD_FORMS = ("linear", "mlp")  # a head: one linear layer (§3.2), or §E.2's Linear -> LayerNorm -> GELU -> Dropout -> Linear
HEAD_DROPOUT = 0.1  # the mlp head's dropout: neither the paper (§E.2) nor the authors' code gives it (docs/fidelity.md)
CNN_STUDENTS = ("resnet18", "resnet50", "mobilenet_v2", "resnet-tiny")  # dho/students.py's torchvision builders
TIMM_PREFIX = "timm/"  # timm/ARCH[.TAG]: any timm model (dho/timm_students.py)
CLIP_PREFIX = "clip:"  # clip:NAME or clip:CONFIG.json: an open_clip image tower

TEACHER_MODEL = "ViT-H-14-378-quickgelu"  # the paper's teacher (DFN5B CLIP ViT-H/14 at 378 px)
TEACHER_PRETRAINED = "dfn5b"
TEACHER_TEMPLATES = "tip-adapter"  # the teacher's prompt templates (the reference code's; dho/templates.py)
LOCAL_DIR = "local-dir:"  # --pretrained local-dir:FOLDER: an open_clip model folder (config + weights)


def open_clip_models() -> list[str]:
    """open_clip's model names: `open_clip.list_models()` where open_clip is already imported (it holds the
    configs registered at run time too), else the stems of its package's `model_configs/*.json`, read
    without importing it."""
    if "open_clip" in sys.modules:
        return list(sys.modules["open_clip"].list_models())
    spec = importlib.util.find_spec("open_clip")  # finds the package folder; runs none of its code
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "model_configs"
    return sorted(p.stem for p in folder.glob("*.json"))


def _config_file(option: str, path: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"{option} {path}: open_clip model config not found (no such file)")


def check_student(name: str) -> None:
    """Refuse a --student that names nothing dho builds, with the close names: a CNN student, timm/ARCH (timm
    checks ARCH), clip:NAME, an open_clip model name, or an open_clip model-config .json that exists."""
    if name in CNN_STUDENTS or name.startswith(TIMM_PREFIX):
        return
    source = name[len(CLIP_PREFIX):] if name.startswith(CLIP_PREFIX) else name
    if source.endswith(".json"):
        return _config_file("--student", source)
    models = open_clip_models()
    if source in models:
        return
    hint = did_you_mean(name, [*CNN_STUDENTS, *models]) if source == name else did_you_mean(source, models)
    raise ConfigError(
        f"unknown student {name!r}{hint}; use one of {', '.join(CNN_STUDENTS)}, timm/<timm model name>, an open_clip model "
        "name (e.g. ViT-B-16, clip:ViT-B-16) or a path to an open_clip model-config .json"
    )


def check_teacher_model(model: Optional[str], pretrained: Optional[str]) -> None:
    """Refuse a --model of `dho precompute-teacher` that is neither an open_clip model name nor an existing
    model-config .json, with the close names (ignored with --pretrained local-dir:, which names the model)."""
    if model is None or (pretrained or "").startswith(LOCAL_DIR):
        return
    if model.endswith(".json") or Path(model).is_file():
        if not Path(model).is_file():
            raise ConfigError(f"model config file {model} does not exist; pass an open_clip model name or a config JSON")
        return
    models = open_clip_models()
    if models and model not in models:
        raise ConfigError(unknown_open_clip_model(model, models))


def unknown_open_clip_model(model: str, models: Iterable[str]) -> str:
    """The message of an unknown teacher --model (here and in dho/teacher.py, where open_clip is loaded)."""
    return (f"unknown open_clip model {model!r}{did_you_mean(model, models)}; pass a name from open_clip.list_models() "
            f"(e.g. {TEACHER_MODEL}) or a path to a model-config JSON file")
