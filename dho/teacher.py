"""The zero-shot VLM teacher: any open_clip model, its preprocessing, and its text classifier.

This is the only module that imports open_clip (besides the VLM student builder). It answers
three questions for stage 1 (`dho.precompute`):

- which network, with which weights: `load_teacher(model, pretrained, ...)`. `model` is an
  open_clip model name or a path to an open_clip model-config JSON file (registered with
  open_clip under its file stem). `pretrained` is an open_clip tag (e.g. 'dfn5b'), a local
  checkpoint file, `local-dir:DIR` (open_clip's hf-hub-style folder: open_clip_config.json +
  weights; the folder's config defines the architecture and preprocessing, `model` is ignored)
  or `none` (random init, seeded, so every process builds the same network).
- how images are preprocessed: image size, mean/std, interpolation and resize mode come from
  the pretrained config (tag or local-dir), else open_clip's defaults, which are then printed;
  every field can be overridden. The result is `Teacher.preprocess` and goes into the cache.
- how it predicts: the zero-shot classifier `w_c` = per-class mean of the L2-normalised text
  embeddings of the prompts `template.format(classname)`, re-normalised (`text_classifier_norm`
  "renormalize", Eq. 1) or not ("mean", what the reference code's DFN branch does: logits then
  scale with the norm of the mean, 100 ||m_c|| cos); logits `f_X(x) . w_c / zeta` for a
  normalised image embedding (Alg. 1 line 13 without the KD temperature).

Precision: the teacher runs once, so `auto` is fp16 on CUDA (the reference code's `precision='fp16'`;
bf16 moves a probability by up to ~2e-2) and fp32 on CPU. In bf16/fp16 the image tower's weights are
cast to that dtype (as open_clip's own precision="fp16"), not fp32 weights under autocast; the text
classifier is built once under autocast with fp32 weights.

Weights fingerprint (`Teacher.identity['weights_sha256']`): the sha256 of the checkpoint file when
`pretrained` is a file (streamed); otherwise (tag, local-dir, none) the sha256 of the string
`"<pretrained>\\n"` followed by the state_dict hash, which is sha256 over every tensor in key order
(name, dtype, shape and raw bytes, fp32 as loaded, before moving to the device).

Out of scope: training or fine-tuning the teacher, non-CLIP teachers, few-shot adapters.
"""

from __future__ import annotations

import hashlib
import json
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from dho.data import file_sha256  # noqa: F401 (also this module's API)
from dho.devices import resolve_device
from dho.errors import ConfigError

# The paper's low-shot teacher (Table 6): DFN ViT-H/14 at 378 px. The name must carry
# '-quickgelu': DFN was trained with QuickGELU and the plain name silently uses GELU.
DEFAULT_MODEL = "ViT-H-14-378-quickgelu"
DEFAULT_PRETRAINED = "dfn5b"
DEFAULT_TEMPLATES = "tip-adapter"
DEFAULT_ZETA = 0.01  # logit scale 1/zeta = 100, as CLIP and the reference code

# The 7 ImageNet prompts of Tip-Adapter, used by the DHO reference code.
TIP_ADAPTER_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("squash", "shortest", "longest")
PRECISIONS = ("fp32", "bf16", "fp16")
TEXT_CLASSIFIER_NORMS = ("renormalize", "mean")


def builtin_templates() -> dict[str, list[str]]:
    """Template sets selectable by name: 'tip-adapter' (7), 'openai' (80, open_clip's own list), 'simple'."""
    return {
        "tip-adapter": list(TIP_ADAPTER_TEMPLATES),
        # open_clip stores them as functions of the class name; '{}' turns each back into a template.
        "openai": [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES],
        "simple": ["a photo of a {}."],
    }


def resolve_templates(spec: str | list[str]) -> list[str]:
    """Templates from a built-in name, a file (one template per line), or a list; each must contain '{}'."""
    if isinstance(spec, (list, tuple)):
        templates = [str(t) for t in spec]
        source = "the given list"
    elif spec in builtin_templates():
        return builtin_templates()[spec]
    elif str(spec).startswith("coop:"):  # the CoOp benchmark's prompt of a dataset
        from dho.coop import coop_templates

        return coop_templates(str(spec)[len("coop:"):])
    elif Path(spec).is_file():
        lines = Path(spec).read_text(encoding="utf-8").splitlines()
        templates = [line.strip() for line in lines if line.strip()]
        source = f"template file {spec}"
    else:
        raise ConfigError(
            f"--templates {spec!r} is neither a built-in template set ({', '.join(builtin_templates())}), "
            "coop:DATASET (the CoOp benchmark's prompt), nor an existing file with one template per line"
        )
    if not templates:
        raise ConfigError(f"{source} holds no templates; write one template per line, e.g. 'a photo of a {{}}.'")
    for t in templates:
        if "{}" not in t:
            raise ConfigError(f"template {t!r} in {source} has no '{{}}' where the class name goes")
    return templates


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state_dict in key order: name, dtype, shape, raw bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _canonical_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_json(path: Path, what: str = "") -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}{path} is not valid JSON: {e}") from e


def _register_model(model: str) -> tuple[str, dict]:
    """Resolve --model to (open_clip name, model config); a JSON path is registered under its stem."""
    if model.endswith(".json") or Path(model).is_file():
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"model config file {path} does not exist; pass an open_clip model name or a config JSON")
        cfg = _read_json(path, "model config ")
        if "model_cfg" in cfg:
            raise ConfigError(
                f"{path} looks like an hf-hub-style open_clip_config.json; put it in a folder with the weights "
                "and pass --pretrained local-dir:FOLDER instead of --model"
            )
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ConfigError(f"model config {path} needs the keys embed_dim, vision_cfg and text_cfg (open_clip format)")
        name = path.stem
        if open_clip.get_model_config(name) != cfg:
            open_clip.add_model_config(path)
        return name, cfg
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ConfigError(
            f"unknown open_clip model {model!r}; pass a name from open_clip.list_models() "
            "(e.g. ViT-H-14-378-quickgelu) or a path to a model-config JSON file"
        )
    return model, cfg


def _square_size(size, where: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"{where}: non-square image size {tuple(size)} is not supported; pass --image-size N")
        size = size[0]
    return int(size)


@dataclass
class Teacher:
    """A loaded teacher: normalised image embeddings, its text classifier and where they came from."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    precision: str
    preprocess: dict  # {image_size, interpolation, mean, std, resize_mode, source}
    identity: dict  # {model, pretrained, weights_sha256, model_config_sha256}
    embed_dim: int
    text_classifier: torch.Tensor | None = None  # (C, D) float32: unit rows (renormalize) or template means (mean)
    templates: list[str] = field(default_factory=list)
    text_classifier_norm: str = "renormalize"
    image_encoder: object = None  # model.encode_image, or its torch.compile'd version (`compile=True`)
    image_dtype: torch.dtype | None = None  # the image tower's weights cast to this dtype (bf16/fp16): no autocast

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings f_X(x), float32 (B, D), from preprocessed images (B, 3, S, S)."""
        x = x.to(self.device, non_blocking=True)
        encode = self.image_encoder or self.model.encode_image
        if self.image_dtype is not None:  # weights and activations in the compute dtype, as open_clip's precision="fp16"
            z = encode(x.to(self.image_dtype))  # (B, D)
        else:
            with self.autocast():
                z = encode(x)  # (B, D)
        return F.normalize(z.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings f_T(t), float32 (T, D)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)  # (b, context_length)
            with self.autocast():
                z = self.model.encode_text(tokens)  # (b, D)
            out.append(F.normalize(z.float(), dim=-1))
        return torch.cat(out)

    def build_text_classifier(self, classnames: list[str], templates: list[str], norm: str = "renormalize") -> torch.Tensor:
        """w_c = mean_t normalise(f_T(template_t(c))), re-normalised unless norm="mean", for every class c
        -> (C, D), also kept on self."""
        if norm not in TEXT_CLASSIFIER_NORMS:
            raise ConfigError(f"--text-classifier-norm must be one of {', '.join(TEXT_CLASSIFIER_NORMS)}, got {norm!r}")
        prompts = [t.replace("{}", c) for c in classnames for t in templates]
        emb = self.encode_texts(prompts).view(len(classnames), len(templates), -1)  # (C, T, D)
        mean = emb.mean(dim=1)  # (C, D)
        self.text_classifier = F.normalize(mean, dim=-1) if norm == "renormalize" else mean
        self.templates = list(templates)
        self.text_classifier_norm = norm
        return self.text_classifier

    def logits(self, image_emb: torch.Tensor, zeta: float = DEFAULT_ZETA) -> torch.Tensor:
        """Zero-shot logits f_X(x) . w_c / zeta (Eq. 1; = cos / zeta for unit w_c) from normalised embeddings (B, D) -> (B, C)."""
        if self.text_classifier is None:
            raise ConfigError("the teacher has no text classifier yet; call build_text_classifier(classnames, templates)")
        return image_emb.float() @ self.text_classifier.to(image_emb.device).T / zeta


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> fp16 on CUDA (as the reference code; bf16's 8-bit mantissa costs accuracy the cache keeps
    forever), fp32 on CPU (CPU low-precision autocast is allowed but rarely faster)."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of auto, {', '.join(PRECISIONS)}")
    return precision


def load_teacher(
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    device: str | torch.device = "auto",
    precision: str = "auto",
    *,
    classnames: list[str] | None = None,
    templates: str | list[str] = DEFAULT_TEMPLATES,
    text_classifier_norm: str = "renormalize",
    image_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    interpolation: str | None = None,
    resize_mode: str | None = None,
    verbose: bool = True,
    compile: bool | None = False,
    cast_weights: bool = True,
) -> Teacher:
    """Build the teacher through open_clip.create_model_and_transforms and describe it.

    With `classnames`, also builds the zero-shot text classifier from `templates`. The weights stay
    float32; `precision` is applied by autocast in `encode_*`. Random init (`none`) is seeded.
    `compile`: torch.compile the image tower (the first batches compile; same math, fused kernels); None =
    on for CUDA, off on CPU. A compilation that fails falls back to the eager tower with one message.
    `cast_weights` (default): with precision bf16/fp16 the image tower's weights are cast to that dtype and it
    runs without autocast (half the weight traffic, no per-op casts); False keeps fp32 weights under autocast.
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    precision = resolve_precision(precision, device)
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ConfigError(f"--interpolation {interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
    if resize_mode is not None and resize_mode not in RESIZE_MODES:
        raise ConfigError(f"--resize-mode {resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
    for name, v in (("--mean", mean), ("--std", std)):
        if v is not None and len(v) != 3:
            raise ConfigError(f"{name} needs 3 values (R G B), got {list(v)}")

    # ---- which architecture and which weights
    pretrained = str(pretrained)
    weights_file, is_tag = None, False
    if pretrained.startswith("local-dir:"):
        folder = Path(pretrained[len("local-dir:"):])
        config_file = folder / "open_clip_config.json"
        if not config_file.is_file():
            raise ConfigError(f"--pretrained {pretrained}: {config_file} not found (open_clip hf-hub folder layout expected)")
        folder_cfg = _read_json(config_file)
        if "model_cfg" not in folder_cfg:
            raise ConfigError(f"{config_file} has no 'model_cfg' (open_clip hf-hub config format expected)")
        oc_name, oc_pretrained, model_cfg = f"local-dir:{folder}", None, folder_cfg["model_cfg"]
        pp_source = f"{config_file.name} in {folder}" if folder_cfg.get("preprocess_cfg") else None
        identity_model, identity_pretrained = f"local-dir:{folder.name}", f"local-dir:{folder.name}"
        if verbose and model != DEFAULT_MODEL:
            print(f"teacher: architecture from {config_file} (--model {model} is ignored)", file=sys.stderr)
    else:
        oc_name, model_cfg = _register_model(model)
        identity_model = oc_name
        if pretrained.lower() == "none":
            oc_pretrained, pp_source, identity_pretrained = None, None, "none"
        elif Path(pretrained).is_file():
            weights_file = Path(pretrained)
            oc_pretrained, pp_source, identity_pretrained = str(weights_file), None, weights_file.name
        elif open_clip.get_pretrained_cfg(oc_name, pretrained):
            tag_cfg = open_clip.get_pretrained_cfg(oc_name, pretrained)
            tag_quick = bool(tag_cfg.get("quick_gelu", False))
            if tag_quick != bool(model_cfg.get("quick_gelu", False)):
                other = f"{oc_name}-quickgelu" if tag_quick else oc_name.removesuffix("-quickgelu")
                raise ConfigError(
                    f"pretrained tag {pretrained!r} was trained with quick_gelu={tag_quick} but model {oc_name} "
                    f"uses quick_gelu={not tag_quick}; use --model {other}, or the activation is silently wrong"
                )
            oc_pretrained, pp_source, identity_pretrained = pretrained, f"pretrained tag {pretrained!r}", pretrained
            is_tag = True
        else:
            if any(s in pretrained for s in ("/", ".pt", ".bin", ".safetensors")):
                raise ConfigError(f"--pretrained {pretrained}: checkpoint file not found")
            tags = open_clip.list_pretrained_tags_by_model(oc_name)
            raise ConfigError(
                f"--pretrained {pretrained!r} is not a tag of {oc_name} (known tags: {', '.join(tags) or 'none'}), "
                "an existing checkpoint file, local-dir:FOLDER, or none"
            )

    overrides = {
        k: v
        for k, v in dict(image_size=image_size, mean=mean, std=std, interpolation=interpolation, resize_mode=resize_mode).items()
        if v is not None
    }
    # Random init (and anything else drawing from the global RNG while building) is seeded so
    # that every rank and every resumed run builds the very same `none` teacher.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            net, _, _ = open_clip.create_model_and_transforms(
                oc_name,
                pretrained=oc_pretrained,
                precision="fp32",
                device="cpu",
                force_image_size=image_size,
                image_mean=tuple(mean) if mean is not None else None,
                image_std=tuple(std) if std is not None else None,
                image_interpolation=interpolation,
                image_resize_mode=resize_mode,
            )
        except Exception as e:  # noqa: BLE001 - torch.load and open_clip raise many types for a bad checkpoint
            if isinstance(e, ConfigError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            first = first if len(first) <= 160 else first[:157] + "..."
            hint = (
                "with HF_HUB_OFFLINE=1 the weights must already be in the Hugging Face cache; otherwise pass a local "
                "checkpoint file or local-dir:FOLDER"
                if is_tag
                else "check that the checkpoint matches the model architecture"
            )
            raise ConfigError(f"could not build teacher {identity_model} with weights {pretrained!r}: {first}; {hint}") from e
    net.eval()

    # ---- fingerprint of the weights (before moving: fp32 CPU bytes, independent of the device)
    if weights_file is not None:
        weights_sha256 = file_sha256(weights_file)
    else:
        weights_sha256 = hashlib.sha256(f"{identity_pretrained}\n{state_dict_sha256(net)}".encode()).hexdigest()

    # ---- preprocessing actually used (open_clip merged tag/local-dir config, defaults and overrides)
    cfg = net.visual.preprocess_cfg
    preprocess = {
        "image_size": _square_size(cfg["size"], f"teacher {identity_model}"),
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(m) for m in cfg["mean"]],
        "std": [float(s) for s in cfg["std"]],
        "resize_mode": str(cfg["resize_mode"]),
    }
    if preprocess["interpolation"] not in INTERPOLATIONS:
        raise ConfigError(
            f"teacher preprocessing uses interpolation {preprocess['interpolation']!r}; pass --interpolation bicubic or bilinear"
        )
    source = pp_source or "open_clip defaults (the weights carry no preprocessing config)"
    missing = [k for k in ("interpolation", "mean", "std", "resize_mode") if k not in overrides]
    if pp_source is None and missing and verbose:
        shown = ", ".join(f"{k}={preprocess[k]}" for k in ["image_size"] + missing)
        what = "random-init teacher (--pretrained none)" if identity_pretrained == "none" else identity_pretrained
        print(
            f"teacher: {what} carries no preprocessing config; using open_clip defaults {shown} "
            "(override with --image-size/--mean/--std/--interpolation/--resize-mode)",
            file=sys.stderr,
        )
    if overrides:
        source += "; overridden: " + ", ".join(sorted(overrides))
    preprocess["source"] = source

    identity = {
        "model": identity_model,
        "pretrained": identity_pretrained,
        "weights_sha256": weights_sha256,
        "model_config_sha256": _canonical_sha256(model_cfg),
    }
    teacher = Teacher(
        model=net.to(device),
        tokenizer=open_clip.get_tokenizer(oc_name),
        device=device,
        precision=precision,
        preprocess=preprocess,
        identity=identity,
        embed_dim=int(model_cfg["embed_dim"]),
    )
    if classnames is not None:
        teacher.build_text_classifier(list(classnames), resolve_templates(templates), text_classifier_norm)
    if cast_weights and precision in ("bf16", "fp16"):
        # the image tower in the compute dtype (the reference code loads DFN with precision="fp16": half weights),
        # after the text classifier was built under autocast; open_clip's LayerNorm keeps the input dtype
        teacher.image_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        net.visual.to(teacher.image_dtype)
    if compile is None:
        compile = device.type == "cuda"
    if compile:  # the image tower only: it runs over every view; the text tower ran once above
        teacher.image_encoder = EagerFallback(torch.compile(net.encode_image), net.encode_image,
                                              print if verbose else (lambda msg, **kw: None))
    return teacher


class EagerFallback:
    """A compiled function that falls back to its eager original, for good, the first time compiling or
    running the compiled version raises (an unsupported op, a missing compiler toolchain, ...), saying so
    in one line. Exceptions of the eager original propagate as they are."""

    def __init__(self, compiled, eager, log):
        self.compiled, self.eager, self.log = compiled, eager, log
        self.failed: str | None = None

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any failure of the compiler means: run eagerly
                first = (str(e).strip().splitlines() or [""])[0][:200]
                self.failed = f"{type(e).__name__}: {first}"
                self.log(f"teacher: torch.compile failed ({self.failed}); running the image tower eagerly "
                         "(same numbers up to float rounding; --no-compile skips compiling)", file=sys.stderr, flush=True)
        return self.eager(*args, **kwargs)
