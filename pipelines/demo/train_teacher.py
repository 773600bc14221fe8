"""The demo's stand-in VLM teacher: a tiny open_clip CLIP trained contrastively on digits.

    python pipelines/demo/train_teacher.py --data demo_out/digits/pretrain \
        --config pipelines/demo/demo-clip.json --out demo_out/teacher.pt --seed 0 \
        [--epochs N] [--eval demo_out/digits/task/val --eval demo_out/digits/task/test]

The real pipeline distills a web-pretrained VLM (DFN ViT-H/14) that has never seen the task's
images but knows the class names. To show that offline on 2 CPU cores, the demo pre-trains its
own small CLIP on the `pretrain/` part of the digits only (make_digits.py), with captions drawn
from `TEMPLATES` ("a photo of the number seven."). The result has real zero-shot knowledge of
the digits and is good but imperfect on `task/` images, like a real teacher.

Model (`demo-clip.json`): open_clip's CLIP with a ModifiedResNet image tower (the CLIP RN50
design: 3-conv stem, one bottleneck per stage, attention pooling; base width 16, 1.3M
parameters) on 32-px images, a 2-layer width-64 text transformer (context 77, the CLIP BPE
vocabulary) and a 64-d joint space. A ViT tower (3x96, 4-px patches) was tried first: from
scratch on ~630 images it sat at chance for a seed-dependent 3-15 epochs, so its zero-shot
top-1 ranged from 47% to 96% across seeds; the conv tower learns from the first epoch.

Training is CLIP's: symmetric InfoNCE between image and caption embeddings with a learnable
logit scale (clamped at 100, as open_clip does). Two differences, both because the data is
ten classes and ~630 images rather than the web:
- a batch holds several images of the same digit, so every caption of the same class is a
  positive (targets spread uniformly over them) instead of a false negative; with all labels
  distinct this is exactly CLIP's loss (`clip_loss`);
- on the `plain` scene, `CAPTION_NOISE` = 15% of the images carry, once and for all, a caption
  naming another class, like wrong alt-text. Without it the teacher is ~99% right on task images
  and there is nothing for distillation to improve on; with it, it lands at 85-90% zero-shot on
  task images (seeds 0-2). The `cluttered` scene (`run_demo.py --scene cluttered`) is hard enough without
  noise: clean captions, 40 epochs of 58 batches of 64 over the 3774 renders, ~43% zero-shot on
  task/val (SCENE_DEFAULTS; chosen on val only: batch 32 with lr 2-3e-3 sat at chance for 15+
  epochs; gentler crops (scale 0.85-1) with plain renders mixed in reached 29% on val).
Augmentation: one random affine warp per image covering RandomResizedCrop(scale 0.5-1, ratio
3/4-4/3), a rotation of up to 10 degrees and a left-right flip with p = 0.5, because those are
the views `dho precompute-teacher` shows it (its views always flip with p = 0.5). Trained
without flips, the teacher was as good on centred images but right on only ~28% of the
flipped views, i.e. half of the cache; with flips it is right on ~75-83% of all cache views.

Output: `teacher.pt`, a plain state_dict that `open_clip.create_model("demo-clip",
pretrained="teacher.pt")` loads (after `open_clip.add_model_config("demo-clip.json")`; the
model name is the config file's stem), i.e. `dho precompute-teacher --model
pipelines/demo/demo-clip.json --pretrained teacher.pt --templates
pipelines/demo/digits-templates.txt`; and `teacher.json` beside it with the settings, the
zero-shot top-1 on the pretrain images (true labels) and on every `--eval` folder, the loss
curve and the wall time. Preprocessing is open_clip's default for a local checkpoint: 32 px,
bicubic, OpenAI CLIP mean/std (`open_clip.OPENAI_DATASET_MEAN/STD`); the 32-px PNGs are never
resized.

Deterministic for a given seed on a given machine (torch.use_deterministic_algorithms, two
threads). Out of scope: multi-process training, GPUs, other datasets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from dho.errors import ConfigError, DatasetError

# Caption templates, used both as training captions and for the zero-shot classifier; the
# file is also what `dho precompute-teacher --templates` reads (one template per line).
TEMPLATES_FILE = Path(__file__).resolve().parent / "digits-templates.txt"
TEMPLATES = [line.strip() for line in TEMPLATES_FILE.read_text().splitlines() if line.strip()]
MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)  # open_clip's default preprocess
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

# Defaults of the plain scene: ~40 s on 2 CPU cores for ~630 pretrain images (see docs/design.md, demo).
EPOCHS = 20  # 39 steps each; 85-90% zero-shot on task images in ~40 s
BATCH_SIZE = 16  # small batches = more steps in the time budget; ~1.6 images per class each
LR = 2e-3  # AdamW peak, linear warmup over the first epoch, then cosine to 0
WEIGHT_DECAY = 0.1  # on weight matrices only (not gains, biases, position/class embeddings, logit scale)
CAPTION_NOISE = 0.15  # fraction of images whose caption names another class (imperfect teacher)
CLUTTERED_EPOCHS = 40  # the cluttered scene: 3774 renders, 58 steps of 64 per epoch (chosen on task/val, docs/demo.md)
CLUTTERED_BATCH_SIZE = 64
CLUTTERED_LR = 2e-3
# Per scene of the pre-training images (make_digits.py --scene, read from digits.json beside DIR/pretrain); an
# option given on the command line wins. The cluttered scene's were chosen on task/val only (docs/demo.md).
SCENE_DEFAULTS = {
    "plain": {"epochs": EPOCHS, "batch_size": BATCH_SIZE, "lr": LR, "caption_noise": CAPTION_NOISE},
    "cluttered": {"epochs": CLUTTERED_EPOCHS, "batch_size": CLUTTERED_BATCH_SIZE, "lr": CLUTTERED_LR, "caption_noise": 0.0},
}


def data_scene(data: str | Path) -> str:
    """The scene of a make_digits.py export's pretrain folder (its digits.json); `plain` for folders without one."""
    record = Path(data).resolve().parent / "digits.json"
    return json.loads(record.read_text()).get("scene", "plain") if record.is_file() else "plain"
CROP_SCALE = (0.5, 1.0)  # area fraction of the crop, as dho's RandomResizedCrop views
MAX_ROTATION = 10.0  # degrees
FLIP = 0.5  # mirrored views, as dho's views (see the module docstring)
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp of exp(logit_scale)


def register_config(config: str | Path) -> str:
    """Register an open_clip model config JSON; return its model name (the file stem)."""
    config = Path(config)
    cfg = json.loads(config.read_text())
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise ConfigError(f"{config} is not an open_clip model config: it lacks {sorted(missing)}; "
                          "start from pipelines/demo/demo-clip.json")
    open_clip.add_model_config(config)
    return config.stem


def load_image_folder(root: str | Path, max_per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """ImageFolder tree -> (images (N, 3, H, W) float in [0, 1], labels (N,), classnames).

    Class index = position of the folder name in sorted order (as `dho prepare`); files in
    sorted order; `max_per_class` keeps the first files of every class (quick tests).
    """
    root = Path(root)
    classnames = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classnames:
        raise DatasetError(f"{root} has no class folders; make it with pipelines/demo/make_digits.py --out DIR")
    images, labels = [], []
    for c, name in enumerate(classnames):
        files = sorted((root / name).glob("*.png"))[:max_per_class]
        for f in files:
            rgb = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
            images.append(torch.from_numpy(rgb).permute(2, 0, 1))
            labels.append(c)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), classnames


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> CLIP-normalised, as open_clip's preprocess does."""
    return (images - MEAN) / STD


def random_views(images: torch.Tensor, generator: torch.Generator, scale=CROP_SCALE,
                 ratio=(3 / 4, 4 / 3), max_rotation: float = MAX_ROTATION, flip: float = FLIP) -> torch.Tensor:
    """One random crop-resize-rotate(-flip) per image, as a single batched affine warp.

    The crop covers `scale` of the area with aspect ratio in `ratio` (RandomResizedCrop's
    ranges), lies inside the image (up to the rotation's corners; borders are replicated),
    is rotated by up to `max_rotation` degrees and mirrored left-right with probability
    `flip`. (B, 3, H, W) -> (B, 3, H, W).
    """
    B = images.shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(B, generator=generator)  # (B,)

    area = uniform(*scale)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # (B,) crop width as a fraction of the image
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = uniform(-1.0, 1.0) * (1.0 - w)  # (B,) crop centre in [-1, 1] coordinates
    cy = uniform(-1.0, 1.0) * (1.0 - h)
    angle = torch.deg2rad(uniform(-max_rotation, max_rotation))
    cos, sin = torch.cos(angle), torch.sin(angle)
    mirror = torch.where(torch.rand(B, generator=generator) < flip, -1.0, 1.0)  # (B,) x -> -x of the output
    theta = torch.stack([
        torch.stack([mirror * w * cos, -h * sin, cx], dim=1),
        torch.stack([mirror * w * sin, h * cos, cy], dim=1),
    ], dim=1)  # (B, 2, 3): output grid -> input coordinates
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE of CLIP, with same-class pairs as positives.

    image_features, text_features: (B, D) L2-normalised, row i of both is a matching pair.
    logits = logit_scale * image_features @ text_features.T; the target of row i is uniform
    over {j : labels[j] == labels[i]} (the identity when labels is None or all distinct, i.e.
    open_clip's ClipLoss). loss = (CE(image -> text) + CE(text -> image)) / 2.
    """
    logits = logit_scale * image_features @ text_features.T  # (B, B)
    if labels is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
    same = (labels[:, None] == labels[None, :]).float()  # (B, B), symmetric
    targets = same / same.sum(dim=1, keepdim=True)  # (B, B), rows sum to 1
    image_to_text = F.cross_entropy(logits, targets)
    text_to_image = F.cross_entropy(logits.T, targets)
    return {"loss": (image_to_text + text_to_image) / 2, "image_to_text": image_to_text,
            "text_to_image": text_to_image}


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """(C, D) text classifier: per-class mean of L2-normalised template embeddings, re-normalised
    (the teacher's w_c of Eq. 1)."""
    tokens = tokenizer([t.format(c) for c in classnames for t in templates])  # (C * T, L)
    emb = model.encode_text(tokens, normalize=True).view(len(classnames), len(templates), -1)  # (C, T, D)
    return F.normalize(emb.mean(dim=1), dim=-1)


@torch.no_grad()
def zero_shot_predict(model, classifier: torch.Tensor, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """argmax_c cos(f_X(x), w_c) for (N, 3, H, W) images in [0, 1] -> (N,) predicted classes."""
    preds = []
    for i in range(0, len(images), batch_size):
        z = model.encode_image(normalize(images[i:i + batch_size]), normalize=True)  # (B, D)
        preds.append((z @ classifier.T).argmax(dim=1))
    return torch.cat(preds)


def noisy_captions(labels: torch.Tensor, num_classes: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """The class each image's caption names: the true one, except for a `noise` fraction of the
    images (drawn once) whose caption names a uniformly drawn *other* class, like wrong alt-text."""
    flip = torch.rand(len(labels), generator=generator) < noise  # (N,)
    other = (labels + torch.randint(1, num_classes, (len(labels),), generator=generator)) % num_classes
    return torch.where(flip, other, labels)


def prune_vocabulary(model, tokenizer, classnames: list[str], templates: list[str]) -> int:
    """Zero the token-embedding rows of every BPE token that no caption (template x class name) uses.

    The text tower's 49408 x 64 token embedding is two thirds of the checkpoint, yet the demo only
    ever encodes these captions: the rows they use are kept bit for bit, so every text the demo
    encodes gives exactly the same embedding, and the shipped checkpoint compresses ~3x.
    Returns the number of rows kept.
    """
    tokens = tokenizer([t.format(c) for c in classnames for t in templates])  # (C * T, L)
    used = torch.unique(tokens)  # (K,) includes the start/end/padding tokens
    keep = torch.zeros(model.token_embedding.weight.shape[0], dtype=torch.bool)
    keep[used] = True
    with torch.no_grad():
        model.token_embedding.weight[~keep] = 0.0
    return int(keep.sum())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; gains, biases, embeddings of positions/class and the
    logit scale are not decayed (as in CLIP)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "positional_embedding" in name or "class_embedding" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_teacher(data: str | Path, config: str | Path, out: str | Path, seed: int = 0, epochs: int | None = None,
                  batch_size: int | None = None, lr: float | None = None, weight_decay: float = WEIGHT_DECAY,
                  crop_scale: tuple[float, float] = CROP_SCALE, templates: list[str] = TEMPLATES,
                  caption_noise: float | None = None, max_per_class: int | None = None,
                  eval_dirs: tuple[str | Path, ...] = (), threads: int = 2, log_every: int = 5) -> dict:
    """Train the demo CLIP on the ImageFolder `data`; write `out` (state_dict) and `out`.json.

    `epochs`, `batch_size`, `lr`, `caption_noise` left None take SCENE_DEFAULTS of the data's scene.
    Returns the teacher.json record: settings, `loss_per_epoch`, `zero_shot_top1` (pretrain
    and every eval dir), `wall_time_s`, `sha256` of the checkpoint.
    """
    scene = data_scene(data)
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "caption_noise": caption_noise}
    settings = {k: SCENE_DEFAULTS[scene][k] if v is None else v for k, v in given.items()}
    with deterministic_cpu(threads):
        return _train_teacher(data, config, out, seed, settings["epochs"], settings["batch_size"], settings["lr"],
                              weight_decay, crop_scale, templates, settings["caption_noise"], max_per_class, eval_dirs,
                              threads, log_every, scene)


@contextmanager
def deterministic_cpu(threads: int):
    """Deterministic kernels, `threads` threads and a forked global RNG, all restored on exit
    (so importing callers, e.g. a test session, keep their own settings)."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng():
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


def _train_teacher(data, config, out, seed, epochs, batch_size, lr, weight_decay, crop_scale, templates,
                   caption_noise, max_per_class, eval_dirs, threads, log_every, scene="plain") -> dict:
    start = time.perf_counter()
    torch.manual_seed(seed)  # model init
    generator = torch.Generator().manual_seed(seed)  # batches, captions, augmentation
    out = Path(out)

    name = register_config(config)
    model = open_clip.create_model(name)
    tokenizer = open_clip.get_tokenizer(name)
    images, labels, classnames = load_image_folder(data, max_per_class)  # (N, 3, H, W), (N,)
    captions = tokenizer([t.format(c) for c in classnames for t in templates])  # (C * T, L), class-major
    n, num_templates = len(labels), len(templates)
    caption_labels = noisy_captions(labels, len(classnames), caption_noise, generator)  # (N,) fixed per image
    steps_per_epoch = max(1, n // batch_size)  # drop the ragged last batch
    total_steps, warmup_steps = epochs * steps_per_epoch, steps_per_epoch
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    print(f"teacher {name}: {n} images, {len(classnames)} classes, {epochs} epochs x {steps_per_epoch} steps of {batch_size}")
    loss_per_epoch, step = [], 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        epoch_loss = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]  # (B,)
            y = caption_labels[idx]  # (B,) the class its caption names
            caption = y * num_templates + torch.randint(num_templates, (len(idx),), generator=generator)  # (B,)
            x = normalize(random_views(images[idx], generator, scale=crop_scale))  # (B, 3, H, W)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)

            image_features = model.encode_image(x, normalize=True)  # (B, D)
            used, inverse = torch.unique(caption, return_inverse=True)  # each distinct caption encoded once
            text_features = model.encode_text(captions[used], normalize=True)[inverse]  # (B, D)
            losses = clip_loss(image_features, text_features, model.logit_scale.exp(), y)
            if not torch.isfinite(losses["loss"]):
                raise ConfigError(f"teacher loss is {losses['loss'].item()} at epoch {epoch} step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
            epoch_loss += losses["loss"].item()
            step += 1
        loss_per_epoch.append(epoch_loss / steps_per_epoch)
        if (epoch + 1) % log_every == 0 or epoch + 1 == epochs:
            rate = (epoch + 1) / (time.perf_counter() - start)
            print(f"epoch {epoch + 1}/{epochs} loss {loss_per_epoch[-1]:.4f} "
                  f"logit_scale {model.logit_scale.exp().item():.1f} ({rate:.2f} epochs/s, "
                  f"eta {(epochs - epoch - 1) / rate:.0f} s)", flush=True)
    train_time = time.perf_counter() - start

    model.eval()
    kept_tokens = prune_vocabulary(model, tokenizer, classnames, templates)
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates)  # (C, D)
    top1 = {"pretrain": (zero_shot_predict(model, classifier, images) == labels).float().mean().item()}
    for d in eval_dirs:
        eval_images, eval_labels, eval_classnames = load_image_folder(d)
        if eval_classnames != classnames:
            raise DatasetError(f"{d} has classes {eval_classnames}, the teacher was trained on {classnames}; "
                               "pass a folder of the same make_digits.py export")
        top1[str(d)] = (zero_shot_predict(model, classifier, eval_images) == eval_labels).float().mean().item()

    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    record = {
        "model": name, "config": json.loads(Path(config).read_text()), "checkpoint": out.name, "scene": scene,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "data": str(data), "num_images": n,
        "classnames": classnames, "templates": list(templates), "seed": seed, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "caption_noise": caption_noise, "noisy_captions": int((caption_labels != labels).sum()), "crop_scale": list(crop_scale),
        "max_rotation": MAX_ROTATION, "flip": FLIP, "threads": threads,
        "preprocess": {k: model.visual.preprocess_cfg[k] for k in ("size", "interpolation", "mean", "std", "resize_mode")},
        "vocabulary_rows_kept": kept_tokens, "loss_per_epoch": loss_per_epoch, "logit_scale": model.logit_scale.exp().item(),
        "zero_shot_top1": top1, "train_time_s": train_time, "wall_time_s": time.perf_counter() - start,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print("zero-shot top-1: " + ", ".join(f"{k} {v:.3f}" for k, v in top1.items()) + f"; {record['wall_time_s']:.0f} s")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="ImageFolder of the teacher pre-training images (DIR/pretrain)")
    parser.add_argument("--config", required=True, type=Path, help="open_clip model config JSON (pipelines/demo/demo-clip.json)")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint to write (teacher.json goes beside it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, batches, captions and augmentation")
    def scene_default(key: str) -> str:
        return " (default: the data's scene's, " + ", ".join(f"{scene} {d[key]}" for scene, d in SCENE_DEFAULTS.items()) + ")"

    parser.add_argument("--epochs", type=int, help="passes over the pre-training images" + scene_default("epochs"))
    parser.add_argument("--batch-size", type=int, help="images (and captions) per contrastive batch" + scene_default("batch_size"))
    parser.add_argument("--lr", type=float, help="AdamW peak learning rate" + scene_default("lr"))
    parser.add_argument("--caption-noise", type=float, help="fraction of images whose caption names another class "
                        "(makes the teacher imperfect)" + scene_default("caption_noise"))
    parser.add_argument("--eval", action="append", default=[], type=Path, metavar="DIR",
                        help="also report zero-shot top-1 on this ImageFolder (repeatable); never used for training")
    args = parser.parse_args()
    train_teacher(args.data, args.config, args.out, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, caption_noise=args.caption_noise, eval_dirs=tuple(args.eval))


if __name__ == "__main__":
    main()
