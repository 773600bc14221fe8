"""The zero-shot VLM teacher: any open_clip model, its preprocessing, and its text classifier.

This is the only module that imports open_clip (besides the VLM student builder, and `dho.templates`,
which reads open_clip's list of the "openai" templates). It answers three questions for stage 1
(`dho.precompute`):

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
  embeddings of the prompts (the templates of `dho.templates` with `{}` replaced by the class
  name), re-normalised (`text_classifier_norm` "renormalize", Eq. 1) or not ("mean", what the reference code's DFN branch does: logits then
  scale with the norm of the mean, 100 ||m_c|| cos); logits `f_X(x) . w_c / zeta` for a
  normalised image embedding (Alg. 1 line 13 without the KD temperature).

Precision: the teacher runs once, so `auto` is fp16 on CUDA (the reference code's `precision='fp16'`;
bf16 moves a probability by up to ~2e-2) and fp32 on CPU. In bf16/fp16 the image tower is cast tensor by
tensor as open_clip's own precision="fp16" casts it (conv, linear and attention weights to that dtype;
LayerNorms, the class and positional embeddings in fp32), not fp32 weights under autocast; the text
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

from dho.data import Preprocessing, file_sha256  # file_sha256: also this module's API
from dho.devices import resolve_device
from dho.errors import ConfigError
from dho.losses import ZETA
from dho.names import TEACHER_MODEL, TEACHER_PRETRAINED, unknown_open_clip_model
from dho.templates import PROMPT_NAMES, TEACHER_TEMPLATES, fill_templates, resolve_templates, template_mean

# The paper's low-shot teacher (Table 6): DFN ViT-H/14 at 378 px. The name must carry
# '-quickgelu': DFN was trained with QuickGELU and the plain name silently uses GELU.
DEFAULT_MODEL = TEACHER_MODEL  # (dho/names.py: known before torch is imported)
DEFAULT_PRETRAINED = TEACHER_PRETRAINED
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("squash", "shortest", "longest")
PRECISIONS = ("fp32", "bf16", "fp16")
TEXT_CLASSIFIER_NORMS = ("renormalize", "mean")


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
        raise ConfigError(unknown_open_clip_model(model, open_clip.list_models()))
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
    preprocess: Preprocessing  # its views and normalisation (with `source`: where the values came from)
    identity: dict  # {model, pretrained, weights_sha256, model_config_sha256, prompt_names}
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
        prompts = fill_templates(templates, classnames)  # C * T, class-major
        emb = self.encode_texts(prompts).view(len(classnames), len(templates), -1)  # (C, T, D), in chunks of 256
        self.text_classifier = template_mean(emb, renormalize=norm == "renormalize")  # (C, D)
        self.templates = list(templates)
        self.text_classifier_norm = norm
        return self.text_classifier

    def logits(self, image_emb: torch.Tensor, zeta: float = ZETA) -> torch.Tensor:
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
    templates: str | list[str] = TEACHER_TEMPLATES,
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
    overrides = {
        k: v
        for k, v in dict(image_size=image_size, mean=mean, std=std, interpolation=interpolation, resize_mode=resize_mode).items()
        if v is not None
    }

    source = _resolve_source(model, str(pretrained), verbose)
    net = _build_network(source, str(pretrained), overrides)
    identity = _identity(source, net)  # before moving: fp32 CPU bytes, independent of the device
    preprocess = _preprocess(net, source, overrides, verbose)
    teacher = Teacher(
        model=net.to(device),
        tokenizer=open_clip.get_tokenizer(source.oc_name),
        device=device,
        precision=precision,
        preprocess=preprocess,
        identity=identity,
        embed_dim=int(source.model_cfg["embed_dim"]),
    )
    if classnames is not None:
        teacher.build_text_classifier(list(classnames), resolve_templates(templates), text_classifier_norm)
    if cast_weights and precision in ("bf16", "fp16"):
        # the image tower as open_clip's precision="fp16" (bf16) makes it (the reference code loads DFN so), after the
        # text classifier was built under autocast
        teacher.image_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        _cast_image_tower(net, teacher.image_dtype, timm="timm_model_name" in source.model_cfg.get("vision_cfg", {}))
    if compile is None:
        compile = device.type == "cuda"
    if compile:  # the image tower only: it runs over every view; the text tower ran once above
        teacher.image_encoder = EagerFallback(torch.compile(net.encode_image), net.encode_image,
                                              print if verbose else (lambda msg, **kw: None))
    return teacher


@dataclass(frozen=True)
class _Source:
    """Which architecture with which weights: what open_clip builds, and how the cache names it."""

    oc_name: str  # the open_clip model name (`local-dir:FOLDER` for a folder)
    oc_pretrained: str | None  # open_clip's `pretrained`: a tag, a file, or None (random init; a folder's own weights)
    model_cfg: dict  # the architecture's open_clip model config
    pp_source: str | None  # where the preprocessing config comes from; None: open_clip's defaults
    identity_model: str
    identity_pretrained: str
    weights_file: Path | None = None  # a checkpoint file, fingerprinted by its bytes
    is_tag: bool = False


def _cast_image_tower(net: torch.nn.Module, dtype: torch.dtype, timm: bool) -> None:
    """Cast the image tower as open_clip's `create_model(..., precision="fp16"|"bf16")` does: conv, linear and
    attention weights and the output projection to `dtype`; LayerNorm parameters, the class and positional
    embeddings stay float32, and LayerNorms compute in float32 (open_clip builds them as LayerNormFp32 then).
    A timm tower is cast whole, its LayerNormFp32s back to float32, as open_clip does."""
    from open_clip.model import convert_weights_to_lp
    from open_clip.transformer import LayerNorm, LayerNormFp32

    if timm:
        net.visual.to(dtype)
        for m in net.visual.modules():
            if isinstance(m, LayerNormFp32):
                m.float()
        return
    for m in net.visual.modules():
        if type(m) is LayerNorm:  # open_clip's fp32-built norm computes in the input dtype; its fp16 build's in fp32
            m.__class__ = LayerNormFp32
    convert_weights_to_lp(net.visual, dtype=dtype)


def _resolve_source(model: str, pretrained: str, verbose: bool) -> _Source:
    """--model and --pretrained -> the architecture and the weights (see the module docstring)."""
    if pretrained.startswith("local-dir:"):
        folder = Path(pretrained[len("local-dir:"):])
        config_file = folder / "open_clip_config.json"
        if not config_file.is_file():
            raise ConfigError(f"--pretrained {pretrained}: {config_file} not found (open_clip hf-hub folder layout expected)")
        folder_cfg = _read_json(config_file)
        if "model_cfg" not in folder_cfg:
            raise ConfigError(f"{config_file} has no 'model_cfg' (open_clip hf-hub config format expected)")
        if verbose and model != DEFAULT_MODEL:
            print(f"teacher: architecture from {config_file} (--model {model} is ignored)", file=sys.stderr)
        pp_source = f"{config_file.name} in {folder}" if folder_cfg.get("preprocess_cfg") else None
        name = f"local-dir:{folder.name}"
        return _Source(f"local-dir:{folder}", None, folder_cfg["model_cfg"], pp_source, name, name)
    oc_name, model_cfg = _register_model(model)
    if pretrained.lower() == "none":
        return _Source(oc_name, None, model_cfg, None, oc_name, "none")
    if Path(pretrained).is_file():
        weights_file = Path(pretrained)
        return _Source(oc_name, str(weights_file), model_cfg, None, oc_name, weights_file.name, weights_file=weights_file)
    tag_cfg = open_clip.get_pretrained_cfg(oc_name, pretrained)
    if tag_cfg:
        tag_quick = bool(tag_cfg.get("quick_gelu", False))
        if tag_quick != bool(model_cfg.get("quick_gelu", False)):
            other = f"{oc_name}-quickgelu" if tag_quick else oc_name.removesuffix("-quickgelu")
            raise ConfigError(
                f"pretrained tag {pretrained!r} was trained with quick_gelu={tag_quick} but model {oc_name} "
                f"uses quick_gelu={not tag_quick}; use --model {other}, or the activation is silently wrong"
            )
        return _Source(oc_name, pretrained, model_cfg, f"pretrained tag {pretrained!r}", oc_name, pretrained, is_tag=True)
    if any(s in pretrained for s in ("/", ".pt", ".bin", ".safetensors")):
        raise ConfigError(f"--pretrained {pretrained}: checkpoint file not found")
    tags = open_clip.list_pretrained_tags_by_model(oc_name)
    raise ConfigError(
        f"--pretrained {pretrained!r} is not a tag of {oc_name} (known tags: {', '.join(tags) or 'none'}), "
        "an existing checkpoint file, local-dir:FOLDER, or none"
    )


def _build_network(source: _Source, pretrained: str, overrides: dict) -> torch.nn.Module:
    """The fp32 CPU network in eval mode, with the preprocessing `overrides`; a failure is one ConfigError."""
    # Random init (and anything else drawing from the global RNG while building) is seeded so
    # that every rank and every resumed run builds the very same `none` teacher.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            net, _, _ = open_clip.create_model_and_transforms(
                source.oc_name,
                pretrained=source.oc_pretrained,
                precision="fp32",
                device="cpu",
                force_image_size=overrides.get("image_size"),
                image_mean=tuple(overrides["mean"]) if "mean" in overrides else None,
                image_std=tuple(overrides["std"]) if "std" in overrides else None,
                image_interpolation=overrides.get("interpolation"),
                image_resize_mode=overrides.get("resize_mode"),
            )
        except Exception as e:  # noqa: BLE001 - torch.load and open_clip raise many types for a bad checkpoint
            if isinstance(e, ConfigError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            first = first if len(first) <= 160 else first[:157] + "..."
            hint = (
                "with HF_HUB_OFFLINE=1 the weights must already be in the Hugging Face cache; otherwise pass a local "
                "checkpoint file or local-dir:FOLDER"
                if source.is_tag
                else "check that the checkpoint matches the model architecture"
            )
            raise ConfigError(f"could not build teacher {source.identity_model} with weights {pretrained!r}: {first}; {hint}") from e
    net.eval()
    return net


def _identity(source: _Source, net: torch.nn.Module) -> dict:
    """`Teacher.identity`: names, the weights fingerprint (see the module docstring), the config's hash and the
    rule that puts class names into its prompts (`dho.templates.PROMPT_NAMES`)."""
    if source.weights_file is not None:
        weights_sha256 = file_sha256(source.weights_file)
    else:
        weights_sha256 = hashlib.sha256(f"{source.identity_pretrained}\n{state_dict_sha256(net)}".encode()).hexdigest()
    return {
        "model": source.identity_model,
        "pretrained": source.identity_pretrained,
        "weights_sha256": weights_sha256,
        "model_config_sha256": _canonical_sha256(source.model_cfg),
        "prompt_names": PROMPT_NAMES,
    }


def _preprocess(net: torch.nn.Module, source: _Source, overrides: dict, verbose: bool) -> Preprocessing:
    """The preprocessing actually used (open_clip merged the tag / local-dir config, its defaults and the overrides)."""
    cfg = net.visual.preprocess_cfg
    size = _square_size(cfg["size"], f"teacher {source.identity_model}")
    interpolation = str(cfg["interpolation"])
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"teacher preprocessing uses interpolation {interpolation!r}; pass --interpolation bicubic or bilinear")
    pp_source = source.pp_source
    described = pp_source or "open_clip defaults (the weights carry no preprocessing config)"
    if overrides:
        described += "; overridden: " + ", ".join(sorted(overrides))
    preprocess = Preprocessing(size, interpolation, cfg["mean"], cfg["std"], str(cfg["resize_mode"]), source=described)
    missing = [k for k in ("interpolation", "mean", "std", "resize_mode") if k not in overrides]
    if pp_source is None and missing and verbose:
        values = preprocess.to_dict()
        shown = ", ".join(f"{k}={values[k]}" for k in ["image_size"] + missing)
        pretrained = source.identity_pretrained
        what = "random-init teacher (--pretrained none)" if pretrained == "none" else pretrained
        print(
            f"teacher: {what} carries no preprocessing config; using open_clip defaults {shown} "
            "(override with --image-size/--mean/--std/--interpolation/--resize-mode)",
            file=sys.stderr,
        )
    return preprocess


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
