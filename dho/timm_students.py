"""timm students: ``timm/ARCH`` or ``timm/ARCH.TAG`` (any ``timm.list_models()`` name) as the feature extractor g.

`build_timm(name, pretrained, interpolation)` gives the classifier-free model
``timm.create_model(ARCH[.TAG], num_classes=0)`` (z = the pooled pre-classifier feature, D =
``head_hidden_size`` where timm's head has a pre-logits layer, else ``num_features``), D, the
preprocessing of its data config (`timm_preprocess`) and the ARCH[.TAG] a model file rebuilds it from
(`rebuild_timm`). `dho.students` puts the two heads on it. Weights: none, timm's (read from the local
Hugging Face or torch hub cache only, never downloaded) or a local state_dict / safetensors file in
timm's format.

This is the only module that imports timm (where it is used: importing this module loads no timm).
Out of scope: ``hf-hub:`` / ``local-dir:`` sources, timm's crop_pct in the evaluation view, timm
``features_only`` / feature-map students.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from dho.data.views import Preprocessing
from dho.errors import ConfigError

TIMM_PREFIX = "timm/"
# timm interpolation -> the closest of dho's two resamplers (None: no close one)
_TIMM_INTERPOLATIONS = {"bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "bicubic", "hamming": "bilinear",
                        "box": "bilinear", "nearest": None, "random": "bicubic"}
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without their wrapper prefixes ('module.' of DataParallel, 'backbone.' of DINO-style checkpoints,
    repeated in any order): the clean-up of every foreign CNN checkpoint, timm's and torchvision's."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "backbone."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _timm_arch_tag(name: str) -> tuple[str, Optional[str]]:
    """``timm/ARCH[.TAG]`` -> (ARCH, TAG or None); unknown architectures or tags raise ConfigError."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    rest = name[len(TIMM_PREFIX):]
    if not rest or any(c in rest for c in "/\\:"):
        raise ConfigError(f"student {name!r}: give a timm registry name after '{TIMM_PREFIX}', e.g. timm/resnet18 or "
                          "timm/resnet18.a1_in1k (hf-hub: and local-dir: sources are not supported)")
    arch, tag = split_model_name_tag(rest)
    if not timm.is_model(arch):
        import difflib

        stem = re.match(r"[a-z]+", arch.lower())
        pattern = f"*{stem.group(0) if stem else arch}*"  # the family: 'resnet9000' -> '*resnet*'
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)  # typos
        close += [m for m in timm.list_models(pattern) if m not in close][:5]
        raise ConfigError(f"unknown timm model {arch!r} (student {name!r}); close matches: {close or 'none'}; "
                          f"see timm.list_models({pattern!r})")
    if tag:
        try:
            get_pretrained_cfg(f"{arch}.{tag}")
        except RuntimeError:
            raise ConfigError(f"timm model {arch} has no pretrained tag {tag!r} (known: {_timm_tags(arch)})") from None
    return arch, tag or None


def _timm_tags(arch: str) -> list[str]:
    import timm

    return [m.split(".", 1)[1] for m in timm.list_pretrained(f"{arch}.*")]


def _timm_weights_tag(arch: str, name_tag: Optional[str], pretrained: str) -> str:
    """The pretrained tag that ``pretrained`` ("timm", TAG, ARCH.TAG or timm/ARCH.TAG) selects."""
    from timm.models import get_pretrained_cfg, split_model_name_tag

    if pretrained == "timm":
        if name_tag:
            return name_tag
        cfg = get_pretrained_cfg(arch)  # timm's default tag for the architecture
        if cfg is None or not cfg.tag:
            raise ConfigError(f"timm model {arch} has no pretrained weights; give --student-pretrained none or a file")
        return cfg.tag
    value = pretrained.removeprefix(TIMM_PREFIX)
    other, tag = split_model_name_tag(value) if "." in value else (arch, value)
    if other != arch:
        raise ConfigError(f"--student-pretrained {pretrained!r} names weights of {other}, not of the student's "
                          f"architecture {arch}; give a tag of {arch} (known: {_timm_tags(arch)})")
    if name_tag and tag != name_tag:
        raise ConfigError(f"the student name selects tag {name_tag!r} but --student-pretrained {pretrained!r} selects "
                          f"{tag!r}; give the tag once (--student timm/{arch}.{name_tag} --student-pretrained timm)")
    if tag not in _timm_tags(arch):
        raise ConfigError(f"--student-pretrained {pretrained!r} is neither a file nor a timm pretrained tag of {arch} "
                          f"(known: {_timm_tags(arch)})")
    return tag


def _timm_cached_file(full_name: str) -> str:
    """The local file of timm's weights for ARCH.TAG: the HF hub cache, else the torch hub cache. Never
    downloads; a miss raises ConfigError saying what to download."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(full_name).to_dict()
    if cfg.get("hf_hub_id"):
        import huggingface_hub

        repo, _, revision = cfg["hf_hub_id"].partition("@")
        first = cfg.get("hf_hub_filename") or "pytorch_model.bin"
        # timm's order: the safetensors alternative of the file first (see timm.models._hub.load_state_dict_from_hf)
        alternatives = {"pytorch_model.bin": "model.safetensors",
                        "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
        safe = alternatives.get(first, first[:-len(".bin")] + ".safetensors" if first.endswith(".bin") else None)
        for filename in (safe, first):
            if filename:
                path = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(path, str):
                    return path
        raise ConfigError(
            f"timm weights {full_name} are not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) "
            f"and dho never downloads them: where there is internet run `hf download {repo}` (same HF_HOME), or "
            f"pass the weights file with --student-pretrained PATH"
        )
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"].split("?")[0])
        if path.is_file():
            return str(path)
        raise ConfigError(f"timm weights {full_name} are not in the torch hub cache ({path}) and dho never downloads "
                          f"them: fetch {cfg['url']} there, or pass the file with --student-pretrained PATH")
    raise ConfigError(f"timm lists no weights file for {full_name}; give --student-pretrained none or a file")


def _load_timm_checkpoint(model: nn.Module, path: Path, full_name: str) -> None:
    """Load a local state_dict / safetensors file in timm's format (``timm.create_model(NAME).state_dict()``;
    wrappers 'state_dict' / 'model' / 'state_dict_ema' and 'module.' prefixes allowed) into the
    classifier-free model; the classifier's keys are ignored, any other mismatch raises ConfigError."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path))
    except Exception as e:  # torch / safetensors raise several types for corrupt or pickled-object files
        raise ConfigError(f"cannot read student checkpoint {path} ({_first_line(e)}); it must be a state_dict of "
                          "tensors (torch.save or .safetensors)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"student checkpoint {path} holds no state_dict of tensors")
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    state = {k: v for k, v in strip_prefixes(state).items() if not k.startswith(tuple(c + "." for c in classifiers))}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"student checkpoint {path} does not fit timm model {full_name}: {len(missing)} missing keys (e.g. "
            f"{missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}), {len(shapes)} shape "
            f"mismatches (e.g. {shapes[:2]}); it must be a state_dict of this architecture "
            f"(timm.create_model({full_name!r}).state_dict(), classifier optional)"
        )
    model.load_state_dict(state)


def timm_preprocess(model: nn.Module, name: str, interpolation: Optional[str] = None) -> Preprocessing:
    """Preprocessing from the model's own data config (timm.data.resolve_model_data_config).

    dho's views are square: a non-square input_size uses its larger side. timm evaluates by resizing
    to image_size / crop_pct and center-cropping image_size; dho's evaluation view is open_clip's
    (resize the short side to image_size, center crop), i.e. crop_pct 1.0: crop_pct is recorded,
    not applied. ``interpolation`` (bilinear | bicubic) overrides timm's; else timm's maps to dho's
    closest resampler, with a warning where they differ.
    """
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    height, width = (int(v) for v in cfg["input_size"][-2:])
    if height != width:
        if model.pretrained_cfg.get("fixed_input_size", False):
            raise ConfigError(f"timm student {name} takes a fixed non-square input {height}x{width}; "
                              "dho's views are square")
        warnings.warn(f"timm student {name}: non-square input size {height}x{width}; dho uses square "
                      f"{max(height, width)} px views", stacklevel=4)
    timm_interp = str(cfg.get("interpolation", "bicubic"))
    if interpolation is None:
        interpolation = _TIMM_INTERPOLATIONS.get(timm_interp)
        if interpolation is None:
            raise ConfigError(f"timm student {name} uses interpolation {timm_interp!r}, which dho does not offer; "
                              "pass --interpolation bilinear or bicubic")
        if interpolation != timm_interp:
            warnings.warn(f"timm student {name}: interpolation {timm_interp!r} -> dho's closest, {interpolation!r} "
                          "(--interpolation picks another)", stacklevel=4)
    return Preprocessing(max(height, width), interpolation, cfg["mean"], cfg["std"], "shortest",
                         crop_pct=float(cfg.get("crop_pct", 1.0)))


def _first_line(e: Exception) -> str:
    """ConfigErrors are one line; torch's load errors span many."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _timm_feature_dim(model: nn.Module) -> int:
    """Width of the pooled output with the classifier removed: ``head_hidden_size`` where the head has its
    own pre-logits layer (MobileNetV3: 1280, its num_features 960), else ``num_features``."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def build_timm(name: str, pretrained: Optional[str], interpolation: Optional[str]) -> tuple[nn.Module, int, dict, str]:
    """-> (classifier-free timm model, D, preprocess, ARCH[.TAG] to rebuild it from)."""
    import timm

    arch, tag = _timm_arch_tag(name)
    file = Path(pretrained) if pretrained is not None and Path(pretrained).is_file() else None
    looks_like_path = pretrained is not None and (pretrained.endswith(_WEIGHT_SUFFIXES)
                                                  or os.sep in pretrained.removeprefix(TIMM_PREFIX))
    if looks_like_path and file is None:
        raise ConfigError(f"student checkpoint {pretrained} not found")
    if pretrained is not None and file is None:
        tag = _timm_weights_tag(arch, tag, pretrained)
    full_name = f"{arch}.{tag}" if tag else arch
    if pretrained is None or file is not None:
        model = timm.create_model(full_name, pretrained=False, num_classes=0)
        if file is not None:
            _load_timm_checkpoint(model, file, full_name)
    else:
        cached = _timm_cached_file(full_name)
        try:  # timm's own loader from the cached file: its checkpoint filter, the classifier dropped
            model = timm.create_model(full_name, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={"file": cached})
        except (RuntimeError, OSError, ValueError) as e:
            raise ConfigError(f"cannot load timm weights {full_name} from {cached}: {_first_line(e)}") from None
    return model, _timm_feature_dim(model), timm_preprocess(model, name, interpolation), full_name


def rebuild_timm(timm_name: str, feature_dim: int) -> nn.Module:
    """The classifier-free architecture ARCH[.TAG] of a model file, random init, offline; it must still give
    `feature_dim` features."""
    import timm

    backbone = timm.create_model(timm_name, pretrained=False, num_classes=0)  # offline
    if _timm_feature_dim(backbone) != feature_dim:
        raise ConfigError(f"timm {timm_name} now gives {_timm_feature_dim(backbone)} features, the "
                          f"model file {feature_dim}: it was written with another timm version's architecture")
    return backbone
