"""Deployable models of a finished run that load without dho: uint8 images of any size -> probabilities.

    dho export RUN --out model.pt2                        # torch.export
    dho export RUN --out model.onnx                       # ONNX for onnxruntime; pip install 'dho[onnx]'
    dho export RUN --out model.ts                         # TorchScript, as dho exported before
    dho export RUN --out DIR --format hf                  # a Hugging Face-style folder (dho.hub): config.json,
                                                          # model.safetensors, README.md (the model card)

The format is the one the suffix of --out names (`SUFFIX_FORMATS`); --format names it for another suffix (and hf).

The model does what ``dho predict`` does, preprocessing included:

    probs = model(images)    # uint8 (B, 3, H, W), RGB 0-255, any B, H, W (one size per batch) -> float32 (B, C)

open_clip's eval transform for the student's ``preprocess`` (``shortest``: resize the short side to
image_size, center-crop; ``squash``: resize to image_size x image_size; ``longest``: resize the long side,
center-pad with black), the student's mean/std, the student, and Eq. 11 with the run's alpha, beta
(``dho.evaluate.run_alpha_beta``). TorchScript also takes one image (3, H, W) -> (1, C); a pt2 or ONNX
graph has a fixed rank, so there one image is ``images[None]``. Loading, without dho:

    torch.export.load("model.pt2").module()(images)       # GPU: torch.export.passes.move_to_device_pass(ep, "cuda")
    onnxruntime.InferenceSession("model.onnx").run(None, {"images": images.numpy()})[0]
    torch.jit.load("model.ts")(images)

Beside OUT: ``OUT`` with suffix ``.safetensors``, the student's state_dict (alpha, beta, class names,
preprocess, build_args in its metadata), and ``OUT.json``: class names, preprocess, alpha, beta, student,
input/output, torch version, sha256 of both files. The same JSON, less the hashes, is inside the model: the
extra file ``dho.json`` (pt2, TorchScript), the metadata property ``dho.json`` (ONNX). A pt2 file is tied
to the torch that wrote it (torch.export's format still changes); keep the weights or the ONNX file for the
long run. Each file is written under a temporary name and renamed into place, the JSON last.

Resize: PIL's antialiased resize (what ``dho predict`` runs through torchvision) as two
``F.interpolate(antialias=True)`` passes (torch's antialiased kernels are PIL's filters), each rounded to
uint8 levels as PIL rounds, in Pillow 13's pass order (height first when it shrinks by more than twice as
many pixels as the width; a ``torch.cond`` in the graph). Sizes are torchvision's (``int(S * long /
short)``; Python's round for crop offsets and ``longest``) computed on symbolic sizes, so one graph serves
every B, H, W. Against ``dho.data.eval_view_uint8`` with Pillow 13.0, S = 32, 7 images (25 x 20 to
301 x 187, photos and noise): bicubic views identical but for 1 value in 10^4, bilinear 0.4-1% of values
one level apart (PIL's fixed-point weights round a few ties the other way), none more. Probabilities
against ``dho predict``: <= 2e-5 on the tests' images (every format), <= 7e-4 on 36 images of 16-500 px
over bilinear/bicubic x shortest/squash/longest, top-1 always the same. With Pillow < 13 (always width
first) ``dho predict`` itself moves: up to a fifth of the values by one level where Pillow 13 goes height
first, probabilities by ~1e-3.

ONNX: the dynamo exporter (``torch.onnx.export`` of the same ExportedProgram as pt2, opset 18) keeps the
symbolic size arithmetic and the pass-order choice (an If node) and maps the antialiased resize to ONNX
Resize(antialias=1, cubic_coeff_a=-0.5, exclude_outside=1), which onnxruntime computes like torch to within
one rounding level. The TorchScript-based exporter would freeze the traced sizes and is deprecated. The
graph's input is `images` (batch, 3, height, width) uint8 and its output `probs` (batch, C), the dynamic
axes named so (`_name_onnx_axes`; the exporter would call them after torch's shape symbols, s34, ...).

ToMe (``--tome-r R``, paper Table 9): the exported graph merges R tokens per block (``dho.tome``), so the file
runs ToMe without dho; OUT.json and ``dho.json`` record the settings under "tome", the weights file is the plain
student's. pt2, ONNX and TorchScript take it (each checked against the eager merged model like any export); an hf
folder refuses it (its loaders build the unmerged model from the weights).

Out of scope: quantisation, fp16 exports, ONNX files over 2 GB (external data), AOTInductor packages,
interpolations other than bilinear and bicubic, and in ``longest`` mode images whose short side resizes to
one pixel (aspect ratio over 2S/3 : 1), which the pt2 graph's shape guards refuse.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import dho
from dho.atomic import LOW_SPACE, check_space, replace_files
from dho.data import file_sha256
from dho.errors import ConfigError, check_choice
from dho.evaluate import load_run, run_alpha_beta
from dho.hub import write_folder, write_weights
from dho.run_dir import MODEL
from dho.students import DualHeadStudent

SUFFIXES = {"pt2": "pt2", "onnx": "onnx", "torchscript": "ts"}  # format -> the usual file suffix
FORMATS = tuple(SUFFIXES)  # the model files; HF_FORMAT writes a folder instead (dho.hub)
HF_FORMAT = "hf"
# --out suffix -> the format it names (`format_for`): a format with a second spelling adds a row
SUFFIX_FORMATS = {".pt2": "pt2", ".onnx": "onnx", ".ts": "torchscript", ".torchscript": "torchscript"}
META_FILE = "dho.json"  # the metadata inside the model (pt2/TorchScript extra file, ONNX metadata property)
INTERPOLATIONS = ("bilinear", "bicubic")  # the PIL filters torch's antialiased interpolate reproduces
RESIZE_MODES = ("shortest", "squash", "longest")
ONNX_OPSET = 18  # the first opset whose Resize has antialias
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the exporter needs the first two; the check after it the third
# exported vs eager probabilities on the check images (uniform noise): the same kernels for pt2 and TorchScript
# (measured <= 1.2e-7); onnxruntime's Resize rounds some pixels one uint8 level apart from torch's (<= 1.6e-3)
VERIFY_ATOL = {"pt2": 1e-4, "torchscript": 1e-4, "onnx": 1e-2}
VIEW_RECIPE = (
    "open_clip's eval transform on the uint8 image: shortest: resize the short side to image_size "
    "(long side int(image_size * long / short)), center-crop image_size x image_size (offsets rounded half to even); "
    "squash: resize to image_size x image_size; longest: resize the long side to image_size keeping the ratio, "
    "center-pad with black. Resizes are PIL's antialiased filter (interpolation) in two passes rounded to uint8 "
    "levels, height first when it shrinks by more than twice as many pixels as the width (Pillow 13). "
    "Then x / 255, minus mean, divided by std per channel."
)


# --------------------------------------------------------------------------------------------
# the deployable module: preprocessing + student + Eq. 11
# --------------------------------------------------------------------------------------------


def _min(a: int, b: int) -> int:
    """min of two sizes that stays symbolic under torch.export (a Python min would specialise H vs W)."""
    if torch.jit.is_scripting():
        return min(a, b)
    return torch.sym_min(a, b)


def _max(a: int, b: int) -> int:
    if torch.jit.is_scripting():
        return max(a, b)
    return torch.sym_max(a, b)


def _round_div(a: int, b: int) -> int:
    """round(a / b) with halves to even (Python's round) for a >= 0, b > 0, in integer ops only (symbolic sizes)."""
    up, down = (2 * a + b) // (2 * b), (2 * a + b - 1) // (2 * b)  # halves rounded up, down; equal unless a tie
    return down + (up - down) * (down % 2)


def _resize_pass(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """One pass of PIL's resize (one of height, width unchanged: an identity there), rounded half up to 0..255."""
    x = F.interpolate(x, size=[height, width], mode=mode, align_corners=False, antialias=True)
    return torch.floor(x + 0.5).clamp(0.0, 255.0)


def _resize(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """PIL's Image.resize of float uint8 levels (B, 3, H, W) -> (B, 3, height, width): the antialiased filter
    (its support widens with the scale), in two passes each rounded to uint8 levels as PIL rounds. Pass order
    as Pillow >= 13: height first when it shrinks by more than twice as many pixels as the width, else width
    first (Pillow < 13: always width first)."""
    h, w = x.shape[-2], x.shape[-1]
    if not torch.jit.is_scripting():
        return _resize_symbolic(x, height, width, mode)
    if h - height > max(0, 2 * (w - width)):
        return _resize_pass(_resize_pass(x, height, w, mode), height, width, mode)
    return _resize_pass(_resize_pass(x, h, width, mode), height, width, mode)


def _resize_symbolic(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """_resize outside TorchScript: under torch.export the sizes are symbolic and torch.cond keeps the pass order
    a choice in the graph (an `if` would fix it to the export example's); eager, a plain `if`."""
    h, w = x.shape[-2], x.shape[-1]

    def height_first(x: torch.Tensor) -> torch.Tensor:
        return _resize_pass(_resize_pass(x, height, w, mode), height, width, mode)

    def width_first(x: torch.Tensor) -> torch.Tensor:
        return _resize_pass(_resize_pass(x, h, width, mode), height, width, mode)

    pred = h - height > _max(0, 2 * (w - width))
    if isinstance(pred, torch.SymBool):
        return torch.cond(pred, height_first, width_first, (x,))
    return height_first(x) if pred else width_first(x)


def _take(x: torch.Tensor, dim: int, index: torch.Tensor, size: int) -> torch.Tensor:
    """x's entries at `index` along `dim`, 0 (black) where index falls outside 0..size-1: torchvision's centered
    pad as a gather, whose output size is len(index) (a pad's symbolic size would reach the student)."""
    inside = (index >= 0) & (index < size)  # (n,)
    shape = [1] * x.dim()
    shape[dim] = index.shape[0]
    return x.index_select(dim, index.clamp(0, size - 1)) * inside.view(shape).to(x.dtype)


class Preprocess(nn.Module):
    """uint8 RGB images (B, 3, H, W) of any size -> the student's normalised eval view (B, 3, S, S), in tensor
    ops that torch.export, ONNX and TorchScript keep dynamic in B, H, W (see ``data.eval_view_uint8``)."""

    def __init__(self, image_size: int, interpolation: str, resize_mode: str, mean, std):
        super().__init__()
        self.image_size = int(image_size)
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # 0 .. S-1, the output grid of crop and pad; a buffer (not an arange on x.device) moves with .to(device)
        self.register_buffer("grid", torch.arange(self.image_size), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError("expected uint8 images (B, 3, H, W), RGB 0-255")
        x = images.float()  # (B, 3, H, W), uint8 levels
        h, w, s = x.shape[-2], x.shape[-1], self.image_size
        if self.resize_mode == "squash":
            x = _resize(x, s, s, self.interpolation)
        elif self.resize_mode == "shortest":
            short = _min(h, w)
            nh, nw = s * h // short, s * w // short  # torchvision Resize(s): the long side int(s * long / short)
            x = _resize(x, nh, nw, self.interpolation)  # (B, 3, nh, nw)
            # torchvision CenterCrop: offsets round((n - s) / 2); index_select, unlike a slice, leaves no view
            # whose contiguity would make torch.export specialise on which side is the short one
            rows = self.grid + _round_div(nh - s, 2)  # (S,)
            cols = self.grid + _round_div(nw - s, 2)  # (S,)
            x = x.index_select(-2, rows).index_select(-1, cols)
        else:  # longest: open_clip's ResizeKeepRatio(longest=1) + CenterCropOrPad(fill=0)
            long = _max(h, w)
            nh, nw = _round_div(s * h, long), _round_div(s * w, long)
            x = _resize(x, nh, nw, self.interpolation)  # (B, 3, nh, nw), one side s
            x = _take(x, -2, self.grid - (s - nh) // 2, nh)  # (B, 3, S, nw)
            x = _take(x, -1, self.grid - (s - nw) // 2, nw)  # (B, 3, S, S)
        return (x / 255.0 - self.mean) / self.std  # (B, 3, S, S), as data.normalize


class StudentProbs(nn.Module):
    """Student + Eq. 11 with fixed alpha, beta: normalised images (B, 3, S, S) -> probs (B, C)."""

    def __init__(self, student: DualHeadStudent, alpha: float, beta: float):
        super().__init__()
        self.backbone = student.backbone
        self.ce_head = student.ce_head
        self.kd_head = student.kd_head
        self.alpha = float(alpha)
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.backbone(x)  # (B, D)
        p_ce = torch.softmax(self.ce_head(z).float(), dim=-1)  # (B, C)
        p_kd = torch.softmax(self.kd_head(z).float() / self.beta, dim=-1)  # (B, C)
        return self.alpha * p_ce + (1.0 - self.alpha) * p_kd  # (B, C)


class DeployableDHO(nn.Module):
    """uint8 images (B, 3, H, W) (or one (3, H, W)) -> probs (B, C): Preprocess, then StudentProbs."""

    def __init__(self, preprocess: nn.Module, probs: nn.Module):
        super().__init__()
        self.preprocess = preprocess
        self.probs = probs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:
            images = images.unsqueeze(0)  # one image -> a batch of one
        if images.dim() != 4 or images.shape[1] != 3:  # HWC or 1-channel: refused, as pt2's and ONNX's shape guards do
            raise ValueError("expected uint8 images (B, 3, H, W) or one image (3, H, W), RGB 0-255 (channels first)")
        return self.probs(self.preprocess(images))


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def weights_path(out: Union[str, Path]) -> Path:
    """The safetensors file written beside the model OUT: OUT + .safetensors (model.pt2.safetensors), so
    exports of one name in two formats never overwrite each other's files."""
    out = Path(out)
    return out.with_name(out.name + ".safetensors")


def metadata_path(out: Union[str, Path]) -> Path:
    """The metadata JSON written beside the model OUT: OUT + .json."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def _is_dho_export(out: Path) -> bool:
    """Whether `out` is a file an earlier `dho export` wrote (its metadata JSON names it), which a new export replaces."""
    try:
        info = json.loads(metadata_path(out).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == "dho-export" and (info.get("files") or {}).get("model") == out.name


def format_for(out: Path, format: Optional[str]) -> str:
    """The format of an export to `out`: `format`, else the one its suffix names (SUFFIX_FORMATS); a format that
    contradicts the suffix, or neither, is a one-line ConfigError (as is an --out that is a folder or the weights file).
    `--format hf` names a folder (any name)."""
    if format == HF_FORMAT:
        return format
    example = SUFFIXES[format if format in FORMATS else "pt2"]
    if out.suffix == ".safetensors":
        raise ConfigError(f"--out {out}: the weights go to OUT.safetensors beside the model; give the model file, e.g. "
                          f"{out.with_suffix('.' + example)}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the file to write, e.g. {out / ('model.' + example)}, or pass "
                          "--format hf to write a Hugging Face-style folder")
    named = SUFFIX_FORMATS.get(out.suffix.lower())
    if format is None:
        if named is None:
            suffixes = ", ".join(f"{s} ({f})" for s, f in SUFFIX_FORMATS.items())
            raise ConfigError(f"--out {out}: the suffix {out.suffix or '(none)'!r} names no format; name the file {suffixes}, "
                              f"or pass --format {' | '.join(FORMATS + (HF_FORMAT,))}")
        return named
    check_choice("--format", format, FORMATS + (HF_FORMAT,))
    if named is not None and named != format:
        raise ConfigError(f"--out {out} names a {named} file but the format is {format}; pass --format {named} or "
                          f"--out {out.with_suffix('.' + SUFFIXES[format])}")
    return format


def export(run_dir: Union[str, Path], out: Union[str, Path], format: Optional[str] = None,
           weights: Optional[str] = None, tome_r: Optional[int] = None) -> Path:
    """Write RUN_DIR/model.pt (with the run's alpha, beta and preprocessing) as a `format` model at `out` (None: the
    format its suffix names, `format_for`), its weights at `weights_path(out)` and its metadata at
    `metadata_path(out)`; return `out`. Format "hf": the folder `out` of `dho.hub.write_folder`. `weights` ema | raw: of a
    run trained with --ema, its EMA (the default) or its trained weights (`dho.students.load_student`). `tome_r`: the
    graph merges that many tokens per block (ToMe, `dho.tome`; ViT students), recorded under "tome" in the metadata;
    pt2, onnx and torchscript only (an hf folder holds weights, which its loaders build without ToMe)."""
    run_dir, out = Path(run_dir), Path(out)
    format = format_for(out, format)
    if format == HF_FORMAT and tome_r is not None:
        raise ConfigError(f"--tome-r: an hf folder holds the weights only, and its loaders build the model without token "
                          f"merging; export ToMe as a graph: --out {out.with_suffix('.pt2')} (or .onnx, .ts)")
    if format == HF_FORMAT:  # a Hugging Face-style folder: config.json, model.safetensors, README.md
        return write_folder(run_dir, out, weights)
    if out.exists() and not _is_dho_export(out):
        raise ConfigError(f"--out {out} exists and is not a dho export (no {metadata_path(out).name} of format dho-export "
                          "beside it); it is left alone: choose another --out or remove it yourself")
    if format == "onnx":
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(f"cannot export {run_dir} as onnx: {', '.join(missing)} not installed; pip install 'dho[onnx]'")
    student, meta = load_run(run_dir, "cpu", weights, tome_r)
    alpha, beta, source = run_alpha_beta(run_dir, meta)
    pre = meta["preprocess"]  # dho.data.Preprocessing
    where = run_dir / MODEL
    if pre.interpolation not in INTERPOLATIONS:
        raise ConfigError(f"{where}: interpolation {pre.interpolation!r} cannot be exported (torch resizes like PIL only "
                          f"with {' or '.join(INTERPOLATIONS)}); retrain the student with --interpolation bilinear or bicubic")
    if pre.resize_mode not in RESIZE_MODES:
        raise ConfigError(f"{where}: unknown resize_mode {pre.resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")
    probs = StudentProbs(student, alpha, beta).eval()
    preprocess = Preprocess(pre.image_size, pre.interpolation, pre.resize_mode, list(pre.mean), list(pre.std)).eval()
    wrapper = DeployableDHO(preprocess, probs).eval()
    info = {
        "format": "dho-export", "version": 2, "dho_version": dho.__version__, "torch_version": torch.__version__,
        "export_format": format, "files": {"model": out.name, "weights": weights_path(out).name},
        "student": meta["build_args"]["name"], "num_classes": len(meta["classnames"]),
        "classnames": meta["classnames"], "alpha": alpha, "beta": beta, "alpha_beta_source": source,
        "preprocess": pre.to_dict(), "view": VIEW_RECIPE,
        "input": "uint8 images (B, 3, H, W), RGB 0-255, any B, H, W" + (
            "; also one image (3, H, W)" if format == "torchscript" else "; one image: images[None]"),
        "output": "float32 probabilities (B, C) = alpha * softmax(ce_head) + (1 - alpha) * softmax(kd_head / beta)",
    }
    if "tome" in meta:
        info["tome"] = meta["tome"]  # token merging in the graph; the weights file is the plain student's
    if format == "onnx":
        info["onnx"] = {"opset": ONNX_OPSET, "input": "images", "output": "probs"}

    # the three files replace the old ones together, the JSON (which hashes the others) last
    with replace_files(out, weights_path(out), metadata_path(out)) as (model_part, weights_part, json_part):
        _write_model(wrapper, probs, format, model_part, info, run_dir, meta["build_args"]["name"])
        write_weights(student, weights_part, meta, alpha, beta)
        sidecar = {**info, "sha256": {"model": file_sha256(model_part), "weights": file_sha256(weights_part)}}
        json_part.write_text(json.dumps(sidecar, indent=2) + "\n")
    return out


def _example_images(size: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """An export example (2, 3, S + 7, 2S + 5) and check batches of other sizes, aspect ratios and batch sizes:
    portrait, smaller than S (upsampled), square."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, 3, size + 7, 2 * size + 5), (3, 3, 2 * size + 3, size + 2), (1, 3, size // 2 + 3, size - 1), (1, 3, size, size)]
    batches = [torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8) for shape in shapes]
    return batches[0], batches[1:]


def _other_format(format: str) -> str:
    """The format to try when `format` fails: pt2 and onnx share torch.export, TorchScript traces instead."""
    return "pt2" if format == "torchscript" else "torchscript"


def _not_exportable(run_dir: Path, student: str, format: str, err: Exception) -> ConfigError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return ConfigError(f"student {student!r} of {run_dir} does not export as {format} ({type(err).__name__}: {first}); "
                       f"try --format {_other_format(format)}")


def _check(run_dir: Path, student: str, format: str, run, wrapper: nn.Module, checks: list[torch.Tensor]) -> None:
    """The exported model must predict like the eager one on sizes, aspect ratios and batch sizes it was not traced with."""
    for x in checks:
        try:
            got = run(x)
        except Exception as e:  # a size or batch the exported graph froze
            raise _not_exportable(run_dir, student, format, e) from e
        diff = (got - wrapper(x)).abs().max().item()
        if not diff < VERIFY_ATOL[format]:
            raise ConfigError(f"student {student!r} of {run_dir}: the {format} export differs from the eager model by "
                              f"{diff:.3g} on images {tuple(x.shape)}; try --format {_other_format(format)}")


@torch.no_grad()
def _write_model(wrapper: DeployableDHO, probs: StudentProbs, format: str, path: Path, info: dict,
                 run_dir: Path, student: str) -> None:
    """Export `wrapper` as `format` to `path`, with `info` inside, after checking it on images it was not traced with."""
    example, checks = _example_images(wrapper.preprocess.image_size, seed=0)
    text = json.dumps(info)
    if format == "torchscript":
        with warnings.catch_warnings():
            # recent torch deprecates TorchScript in favour of torch.export; it still loads with plain torch.jit.load
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
            # ToMe's per-block cap min(r, (N - 1) // 2) reads the token count, fixed by the preprocessing: a constant
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"dho\.tome")
            try:
                # the student traced (open_clip towers do not script), the preprocessing scripted (a trace would
                # freeze its size arithmetic to the example's)
                module = torch.jit.script(DeployableDHO(wrapper.preprocess, torch.jit.trace(probs, wrapper.preprocess(example))))
            except Exception as e:
                raise _not_exportable(run_dir, student, format, e) from e
            _check(run_dir, student, format, module, wrapper, checks)
            # torch's C++ writer aborts the process on a full disk: measured in memory first (a path, not a buffer,
            # names the archive inside after the file, as before)
            size = io.BytesIO()
            torch.jit.save(module, size, _extra_files={META_FILE: text})
            check_space(path, size.tell() + LOW_SPACE)
            torch.jit.save(module, str(path), _extra_files={META_FILE: text})
        return
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=1), 3: torch.export.Dim("width", min=1)}
    try:
        program = torch.export.export(wrapper, (example,), dynamic_shapes=(dims,))
    except Exception as e:  # data-dependent control flow, an op without a meta kernel, a frozen batch size
        raise _not_exportable(run_dir, student, format, e) from e
    if format == "pt2":
        _check(run_dir, student, format, program.module(), wrapper, checks)
        buffer = io.BytesIO()  # in memory first: torch's writer aborts the process on a full disk
        torch.export.save(program, buffer, extra_files={META_FILE: text})
        check_space(path, buffer.tell())
        path.write_bytes(buffer.getbuffer())
        return
    import onnxruntime

    try:
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=ONNX_OPSET, input_names=["images"],
                                         output_names=["probs"], external_data=False, verbose=False)
    except Exception as e:  # an op without an ONNX translation
        raise _not_exportable(run_dir, student, format, e) from e
    _name_onnx_axes(onnx_program.model)
    onnx_program.model.metadata_props[META_FILE] = text
    onnx_program.save(str(path), external_data=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _check(run_dir, student, format, lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), wrapper, checks)


ONNX_AXES = {0: "batch", 2: "height", 3: "width"}  # the named dynamic axes of the ONNX input (B, 3, H, W)


def _name_onnx_axes(model) -> None:
    """The exporter names the input's dynamic axes after torch's shape symbols (s34, s14, s54): name them batch,
    height and width in every shape of the graph (branches included; expressions such as 2*s14 as well), so a
    reader of the file (onnxruntime, netron, a TensorRT profile) sees (batch, 3, height, width) -> (batch, C)."""
    import onnx_ir as ir
    from onnx_ir.traversal import RecursiveGraphIterator

    shape = model.graph.inputs[0].shape
    names = {shape[i].value: name for i, name in ONNX_AXES.items() if isinstance(shape[i], ir.SymbolicDim) and shape[i].value}
    if not names:
        return
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")

    def rename(value) -> None:
        if value is None or value.shape is None:
            return
        dims = [ir.SymbolicDim(symbol.sub(lambda m: names[m.group(1)], d.value))
                if isinstance(d, ir.SymbolicDim) and d.value else d for d in value.shape.dims]
        value.shape = ir.Shape(dims)

    values = [*model.graph.inputs, *model.graph.outputs]
    for node in RecursiveGraphIterator(model.graph):
        values += [*node.inputs, *node.outputs]
        for attr in node.attributes.values():  # an If node's branches: their own outputs
            graphs = attr.value if isinstance(attr.value, (list, tuple)) else [attr.value]
            values += [v for g in graphs if isinstance(g, ir.Graph) for v in (*g.inputs, *g.outputs)]
    for value in {id(v): v for v in values if v is not None}.values():
        rename(value)
