"""The Python API: a finished run, or what `dho export` wrote, as a predictor in a notebook.

    import dho
    run = dho.load_run("runs/r18")           # RUN_DIR of dho distill, a `dho export --format hf` folder, or OUT.safetensors
    run.predict(["cat.jpg", pil_image]).top(5)            # what `dho predict` prints, the same numbers
    x = torch.stack([run.preprocess(im) for im in images])  # (B, 3, S, S): the evaluation view of `dho evaluate`
    probs = run.model(x.to(run.device))      # (B, C), Eq. 11 with run.alpha, run.beta
    out = run.student(x)                     # {"ce_logits", "kd_logits", "z"}: both heads and the features
    exported = dho.load_export("r18.onnx")   # pt2 | onnx | torchscript: uint8 images in, probabilities out

`load_run` takes alpha and beta as `dho predict` does (RUN/alpha_beta.json of a search, else model.pt's); they
can be set (`run.alpha = 0.7`) and `run.model`, `run.predict` follow. `predict` takes paths (folders and quoted
globs as `dho predict`), PIL images, uint8 arrays (H, W, 3), uint8 tensors (3, H, W) / (B, 3, H, W) of raw RGB
pixels, or a float batch (B, 3, S, S) that `preprocess` made; it runs in batches of 64 as `dho predict` does, so
its probabilities are the same floats.

An exported model (`ExportedModel`) preprocesses inside its graph: its `preprocess` only turns a PIL image into
the uint8 (3, H, W) tensor it takes; alpha and beta are baked in (read-only). The safetensors weights beside an
export and an hf folder rebuild the student itself: a `Run`.

Out of scope: training from Python (`dho.distill.distill(DistillConfig(...))` is that API), batching images of
different sizes through an exported model (each image is its own batch of one), GPU placement of ONNX sessions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from dho import data as data_lib
from dho import hub
from dho.devices import resolve_device
from dho.errors import ConfigError, DatasetError, check_number
from dho.evaluate import PREDICT_BATCH, combine_heads, head_probs, image_paths, load_image
from dho.run_dir import RunDir
from dho.students import DualHeadStudent

EXPORT_SUFFIXES = {".pt2": "pt2", ".onnx": "onnx", ".ts": "torchscript"}  # dho.export.SUFFIXES, by suffix
ImageLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------------------------
# what predict returns
# --------------------------------------------------------------------------------------------


@dataclass
class Predictions:
    """probs (N, C) float32 on the CPU, in `classnames` order; `sources` the path of each image (None for an image
    given as pixels); ce_head / kd_head (N, C) with `predict(..., heads=True)` (ce_head a softmax, kd_head one at
    temperature beta)."""

    probs: torch.Tensor
    classnames: list[str]
    sources: list[Optional[Path]]
    ce_head: Optional[torch.Tensor] = None
    kd_head: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.probs.shape[0]

    @property
    def indices(self) -> torch.Tensor:
        """(N,) int64: the top-1 class index of each image."""
        return self.probs.argmax(dim=-1)

    @property
    def labels(self) -> list[str]:
        """The top-1 class name of each image."""
        return [self.classnames[i] for i in self.indices.tolist()]

    def top(self, k: int = 5, head: str = "combined") -> list[list[tuple[str, float]]]:
        """Per image, the k most probable (class name, probability), as `dho predict` prints them; `head` is
        combined (Eq. 11), ce_head or kd_head (those with heads=True)."""
        check_number("k", k, low=1, integer=True)
        scores = {"combined": self.probs, "ce_head": self.ce_head, "kd_head": self.kd_head}.get(head)
        if scores is None:
            raise ConfigError(f"head {head!r}: use combined, or ce_head / kd_head of predict(..., heads=True)")
        t = scores.topk(min(k, len(self.classnames)), dim=-1)
        return [[(self.classnames[c], v) for c, v in zip(i, p)] for i, p in zip(t.indices.tolist(), t.values.tolist())]

    def __repr__(self) -> str:
        return f"Predictions({len(self)} images, {len(self.classnames)} classes, labels={self.labels[:5]}{' ...' if len(self) > 5 else ''})"


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _pil(item, where: str) -> Image.Image:
    """An image given as pixels -> an 8-bit RGB PIL image (`data.to_rgb8`, as decoded files are)."""
    if isinstance(item, Image.Image):
        return data_lib.to_rgb8(item)
    if isinstance(item, torch.Tensor):
        if item.dtype != torch.uint8 or item.dim() != 3 or item.shape[0] != 3:
            raise ConfigError(f"{where}: a tensor image must be uint8 (3, H, W), RGB 0-255; got {item.dtype} {tuple(item.shape)}")
        item = item.permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise ConfigError(f"{where}: an array image must be uint8 (H, W, 3), RGB 0-255; got {item.dtype} {item.shape}")
        return Image.fromarray(np.ascontiguousarray(item), mode="RGB")
    raise ConfigError(f"{where}: cannot read an image from a {type(item).__name__}; give paths, PIL images, uint8 "
                      "arrays (H, W, 3) or tensors (3, H, W)")


def _items(images) -> tuple[list, bool]:
    """predict's input as (items, preprocessed): items are paths and PIL images, or (preprocessed) float views."""
    if isinstance(images, torch.Tensor):
        if images.is_floating_point():  # made by run.preprocess: (B, 3, S, S) or one (3, S, S)
            batch = images[None] if images.dim() == 3 else images
            if batch.dim() != 4 or batch.shape[1] != 3:
                raise ConfigError(f"a float batch must be (B, 3, S, S) from run.preprocess; got {tuple(images.shape)}")
            return list(batch), True
        if images.dim() == 4:  # uint8 (B, 3, H, W) raw pixels
            return [_pil(x, f"images[{i}]") for i, x in enumerate(images)], False
        return [_pil(images, "images")], False
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        images = [images]
    items = []
    for i, item in enumerate(images):
        if isinstance(item, (str, Path)):
            items += image_paths([item])
        elif isinstance(item, torch.Tensor) and item.is_floating_point():
            raise ConfigError(f"images[{i}]: a float tensor is a preprocessed view; pass the whole batch as one tensor")
        else:
            items.append(_pil(item, f"images[{i}]"))
    if not items:
        raise DatasetError("no images given")
    return items, False


def _source(item) -> Optional[Path]:
    return item if isinstance(item, Path) else None


# --------------------------------------------------------------------------------------------
# a run: the student, its preprocessing, Eq. 11
# --------------------------------------------------------------------------------------------


class EvalTransform:
    """PIL image (or a path) -> its evaluation view (3, S, S) float32, normalised: open_clip's eval transform for the
    student (`Preprocessing.eval_view`), what `dho evaluate` and `dho predict` compute."""

    def __init__(self, preprocessing: data_lib.Preprocessing):
        self.preprocessing = preprocessing

    def __call__(self, image: Union[Image.Image, str, Path, np.ndarray]) -> torch.Tensor:
        image = load_image(image) if isinstance(image, (str, Path)) else _pil(image, "image")
        return self.preprocessing.eval_view(image)  # (3, S, S)

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.preprocessing.std

    @property
    def interpolation(self) -> str:
        return self.preprocessing.interpolation

    @property
    def resize_mode(self) -> str:
        return self.preprocessing.resize_mode

    def __repr__(self) -> str:
        p = self.preprocessing
        return (f"EvalTransform(image_size={p.image_size}, resize_mode={p.resize_mode!r}, interpolation={p.interpolation!r}, "
                f"mean={p.mean}, std={p.std})")


class DualHeadClassifier(nn.Module):
    """The student with Eq. 11: normalised views (B, 3, S, S) -> probabilities (B, C) =
    alpha * softmax(ce_head(z)) + (1 - alpha) * softmax(kd_head(z) / beta). `student` is the DualHeadStudent
    (its forward gives ce_logits, kd_logits and z)."""

    def __init__(self, student: DualHeadStudent, alpha: float, beta: float):
        super().__init__()
        self.student = student
        self.alpha = float(alpha)
        self.beta = float(beta)

    @property
    def backbone(self) -> nn.Module:
        return self.student.backbone

    @property
    def ce_head(self) -> nn.Module:
        return self.student.ce_head

    @property
    def kd_head(self) -> nn.Module:
        return self.student.kd_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.student(x)
        return combine_heads(out["ce_logits"], out["kd_logits"], self.alpha, self.beta)  # (B, C)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, beta={self.beta:g}"


class Run:
    """A finished student as a predictor (see the module docstring). Attributes: model (DualHeadClassifier), student,
    preprocess (EvalTransform), preprocessing (the record: size, mean, std, ...), classnames, alpha, beta,
    alpha_beta_source, config (the run's DistillConfig as a dict, or None), meta (the model file's), path, device."""

    def __init__(self, path: Path, student: DualHeadStudent, meta: dict, alpha: float, beta: float, source: str,
                 config: Optional[dict]):
        self.path = Path(path)
        self.student = student.eval()
        self.model = DualHeadClassifier(student, alpha, beta).eval()
        self.meta = meta
        self.preprocessing: data_lib.Preprocessing = meta["preprocess"]
        self.preprocess = EvalTransform(self.preprocessing)
        self.classnames: list[str] = list(meta["classnames"])
        self.alpha_beta_source = source
        self.config = config

    @property
    def alpha(self) -> float:
        return self.model.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        check_number("alpha", value, low=0, high=1)
        self.model.alpha, self.alpha_beta_source = float(value), "explicit"

    @property
    def beta(self) -> float:
        return self.model.beta

    @beta.setter
    def beta(self, value: float) -> None:
        check_number("beta", value, low=0, low_open=True)
        self.model.beta, self.alpha_beta_source = float(value), "explicit"

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def to(self, device: Union[str, torch.device]) -> "Run":
        """Move the model to `device` (auto, cpu, cuda, cuda:N, mps) -> self."""
        self.model.to(resolve_device(device))
        return self

    @torch.no_grad()
    def predict(self, images: Union[ImageLike, Iterable[ImageLike]], batch_size: int = PREDICT_BATCH,
                heads: bool = False) -> Predictions:
        """Probabilities (Eq. 11 with alpha, beta) of each image, in order, as `dho predict` computes them."""
        check_number("batch_size", batch_size, low=1, integer=True)
        items, preprocessed = _items(images)
        self.model.eval()
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            views = chunk if preprocessed else [self.preprocess(item) for item in chunk]
            x = torch.stack(views).to(self.device)  # (B, 3, S, S)
            for name, probs in head_probs(self.student, x, self.alpha, self.beta, heads).items():
                parts.setdefault(name, []).append(probs)
        scores = {name: torch.cat(p) for name, p in parts.items()}  # (N, C) each
        return Predictions(scores["combined"], self.classnames, [None if preprocessed else _source(i) for i in items],
                           scores.get("ce_head"), scores.get("kd_head"))

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}: {self.meta['build_args']['name']}, {self.num_classes} classes, alpha={self.alpha:g}, "
                f"beta={self.beta:g} ({self.alpha_beta_source}), device={self.device})")


def _run_from_weights(path: Path, device) -> Run:
    """OUT.safetensors of `dho export`: the student rebuilt from its metadata."""
    info = hub.read_weights_metadata(path)
    student = hub.load_weights(path, info["build_args"], info["preprocess"], resolve_device(device))
    meta = {**info, "preprocess": student.preprocess, "extra": {}}
    sidecar = path.with_name(path.name[: -len(".safetensors")] + ".json")  # the export's OUT.json, when beside it
    source = str(path.name)
    try:
        source = json.loads(sidecar.read_text()).get("alpha_beta_source", source)
    except (OSError, ValueError, AttributeError):
        pass
    return Run(path, student, meta, info["alpha"], info["beta"], source, None)


def _run_from_folder(path: Path, device) -> Run:
    student, config = hub.read_folder(path, resolve_device(device))
    meta = {"classnames": config["classnames"], "alpha": config["alpha"], "beta": config["beta"],
            "build_args": config["build_args"], "preprocess": student.preprocess, "extra": {"method": config.get("method")},
            "dho_version": config.get("dho_version")}
    return Run(path, student, meta, config["alpha"], config["beta"], config.get("alpha_beta_source") or hub.CONFIG_FILE,
               config.get("distill_config"))


def load_run(path: Union[str, Path], device: Union[str, torch.device] = "auto", weights: Optional[str] = None) -> Run:
    """A finished student as a `Run` on `device` (auto: CUDA, else MPS, else CPU; as `dho predict`): `path` is a
    run folder of `dho distill` (RUN/model.pt, alpha/beta as `dho predict` takes them), a folder of
    `dho export --format hf`, or the OUT.safetensors weights of `dho export`. `weights` ema | raw: of a run folder
    trained with `dho distill --ema`, its EMA (the default) or its trained weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return _run_from_weights(path, device)
    if path.is_dir() and hub.is_hf_folder(path):
        return _run_from_folder(path, device)
    if path.is_file():
        raise ConfigError(f"{path} is a file; load_run takes a run folder, a `dho export --format hf` folder or a "
                          ".safetensors file (for a pt2 / onnx / torchscript file use dho.load_export)")
    run = RunDir(path)
    student, meta = run.load_student(device, weights)
    alpha, beta, source = run.alpha_beta_of(meta)
    return Run(path, student, meta, alpha, beta, source, run.read_config() if run.config.is_file() else None)


# --------------------------------------------------------------------------------------------
# exported models
# --------------------------------------------------------------------------------------------


class ToUint8:
    """PIL image (or a path) -> uint8 (3, H, W) RGB: what an exported model takes (it resizes, crops and normalises
    inside its graph)."""

    def __call__(self, image: Union[Image.Image, str, Path, np.ndarray]) -> torch.Tensor:
        image = load_image(image) if isinstance(image, (str, Path)) else _pil(image, "image")
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W)

    def __repr__(self) -> str:
        return "ToUint8()"


class ExportedModel:
    """A model file of `dho export` (pt2, onnx, torchscript) as a predictor: model (the loaded module, or the
    onnxruntime session), format, info (its metadata JSON), classnames, alpha, beta (baked in: read-only),
    preprocessing (the record the graph applies), preprocess (`ToUint8`), path, device."""

    def __init__(self, path: Path, format: str, model: Any, info: dict):
        self.path, self.format, self.model, self.info = Path(path), format, model, info
        self.classnames: list[str] = list(info["classnames"])
        self.preprocessing = data_lib.Preprocessing.from_dict(info["preprocess"])
        self.preprocess = ToUint8()
        self.alpha_beta_source = info.get("alpha_beta_source")
        self.device = torch.device("cpu")

    @property
    def alpha(self) -> float:
        return float(self.info["alpha"])

    @property
    def beta(self) -> float:
        return float(self.info["beta"])

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def to(self, device: Union[str, torch.device]) -> "ExportedModel":
        """Move a pt2 or TorchScript model to `device` -> self (an ONNX session runs on its providers)."""
        device = resolve_device(device)
        if device == self.device:
            return self
        if self.format == "onnx":
            raise ConfigError(f"{self.path}: an ONNX model runs where its onnxruntime providers run; create an "
                              "InferenceSession with CUDAExecutionProvider yourself")
        if self.format == "torchscript":
            self.model.to(device)
        else:
            from torch.export.passes import move_to_device_pass

            self.model = move_to_device_pass(self._program, device).module()
        self.device = device
        return self

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.format == "onnx":
            return torch.from_numpy(self.model.run(None, {"images": x.cpu().numpy()})[0])
        return self.model(x.to(self.device)).float().cpu()

    @torch.no_grad()
    def predict(self, images: Union[ImageLike, Iterable[ImageLike]]) -> Predictions:
        """Probabilities of each image from the exported graph: a uint8 batch (B, 3, H, W) in one call, every other
        image (paths, PIL images, arrays, (3, H, W) tensors) as a batch of one (sizes differ)."""
        if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4:
            return Predictions(self._run(images), self.classnames, [None] * images.shape[0])
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            raise ConfigError(f"{self.path} is an exported model: it takes uint8 images (B, 3, H, W), RGB 0-255, and "
                              "preprocesses them itself; pass images, not preprocessed views")
        items, _ = _items(images)
        probs = torch.cat([self._run(self.preprocess(item)[None]) for item in items])  # (N, C)
        return Predictions(probs, self.classnames, [_source(i) for i in items])

    def __repr__(self) -> str:
        return (f"ExportedModel({str(self.path)!r}: {self.format}, {self.info.get('student')}, {self.num_classes} classes, "
                f"alpha={self.alpha:g}, beta={self.beta:g})")


def _export_format(path: Path) -> tuple[str, dict]:
    """(format, metadata) of a model file of `dho export`: its OUT.json, else the metadata inside it."""
    from dho.export import META_FILE, metadata_path

    try:
        info = json.loads(metadata_path(path).read_text())
        if isinstance(info, dict) and info.get("format") == "dho-export" and info.get("export_format") in EXPORT_SUFFIXES.values():
            return info["export_format"], info
    except (OSError, ValueError):
        pass
    fmt = EXPORT_SUFFIXES.get(path.suffix)
    if fmt is None:
        raise ConfigError(f"{path}: not a file `dho export` wrote (no {metadata_path(path).name} beside it and the suffix "
                          f"is not {', '.join(EXPORT_SUFFIXES)}); give a pt2, onnx or ts file, an hf folder or a .safetensors file")
    try:
        if fmt == "onnx":
            import onnx

            text = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}[META_FILE]
        else:
            extra = {META_FILE: ""}
            if fmt == "pt2":
                torch.export.load(str(path), extra_files=extra)
            else:
                torch.jit.load(str(path), _extra_files=extra, map_location="cpu")
            text = extra[META_FILE]
        return fmt, json.loads(text)
    except Exception as e:  # another tool's file, truncated
        raise ConfigError(f"cannot read the dho metadata of {path} ({type(e).__name__}: {str(e)[:200]}); "
                          "give a file `dho export` wrote") from e


def load_export(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Union[Run, ExportedModel]:
    """What `dho export` wrote, as a predictor: a pt2 / onnx / torchscript file -> `ExportedModel` (on the CPU;
    `.to(device)` moves pt2 and TorchScript); an hf folder or OUT.safetensors -> `Run` (the rebuilt student)."""
    path = Path(path)
    if path.is_dir():
        if not hub.is_hf_folder(path):
            raise ConfigError(f"{path} is a folder but not a `dho export --format hf` folder (no {hub.CONFIG_FILE} of "
                              f"format {hub.HF_FORMAT}); for a run folder use dho.load_run")
        return _run_from_folder(path, device)
    if not path.is_file():
        raise ConfigError(f"{path} not found; give a file or folder `dho export` wrote")
    if path.suffix == ".safetensors":
        return _run_from_weights(path, device)
    fmt, info = _export_format(path)
    if fmt == "onnx":
        import onnxruntime

        model = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        exported = ExportedModel(path, fmt, model, info)
    elif fmt == "pt2":
        program = torch.export.load(str(path))
        exported = ExportedModel(path, fmt, program.module(), info)
        exported._program = program
    else:
        exported = ExportedModel(path, fmt, torch.jit.load(str(path), map_location="cpu").eval(), info)
    return exported.to(device)


__all__ = ["DualHeadClassifier", "EvalTransform", "ExportedModel", "Predictions", "Run", "ToUint8", "load_export", "load_run"]
