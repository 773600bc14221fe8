"""The demo's own parts: the digits export (make_digits.py) and the tiny CLIP teacher (train_teacher.py).

Real components only: scikit-learn's bundled digits, real PNG files, the real open_clip model
built from pipelines/demo/demo-clip.json and loaded back through open_clip's checkpoint path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from dho.errors import DatasetError

DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo"
CONFIG = DEMO / "demo-clip.json"


def _load(name: str):
    """Import a pipelines/demo script as a module (pipelines/ is not a package)."""
    key = f"dho_demo_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, DEMO / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


make_digits = _load("make_digits")
train_teacher = _load("train_teacher")


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    make_digits.make_digits(out, seed=0)
    return out


def test_make_digits_parts_are_stratified_disjoint_and_complete(digits):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    summary = json.loads((digits / "digits.json").read_text())
    class_sizes = np.bincount(labels)  # (10,) 174..183 per class
    seen: set[int] = set()
    for part, fraction in zip(make_digits.PARTS, make_digits.FRACTIONS):
        folders = sorted(p.name for p in (digits / part).iterdir())
        assert folders == make_digits.SORTED_CLASSNAMES  # words, class index = sorted order
        rows = {int(p.stem.split("-")[1]): p.parent.name for p in (digits / part).rglob("*.png")}
        assert not seen & rows.keys(), f"{part} overlaps an earlier part"
        seen |= rows.keys()
        assert all(make_digits.CLASSNAMES[labels[r]] == name for r, name in rows.items())  # right folder
        per_class = np.bincount([labels[r] for r in rows], minlength=10)
        assert np.all(np.abs(per_class - fraction * class_sizes) <= 1), (part, per_class)
        assert per_class.tolist() == summary["parts"][part]["per_class"]
        assert sorted(rows) == summary["parts"][part]["rows"]
    assert seen == set(range(len(labels)))  # 1797 digits, each in exactly one part
    sizes = {p: summary["parts"][p]["num_samples"] for p in make_digits.PARTS}
    assert sizes == {"pretrain": 629, "task/train": 809, "task/val": 143, "task/test": 216}


def test_make_digits_images_are_32px_rgb_and_byte_identical_per_seed(digits, tmp_path):
    from PIL import Image

    image = Image.open(next((digits / "task" / "test" / "seven").glob("*.png")))
    assert image.size == (32, 32) and image.mode == "RGB"
    pixels = np.asarray(image, dtype=np.int64)  # (32, 32, 3)
    assert pixels.max() - pixels.min() > 80  # ink on paper, not a flat image
    assert not np.array_equal(pixels[..., 0], pixels[..., 1])  # tinted, channels differ

    again = tmp_path / "again"
    make_digits.make_digits(again, seed=0)
    assert _tree_digest(again) == _tree_digest(digits)
    with pytest.raises(DatasetError, match="overwrite"):
        make_digits.make_digits(again, seed=1)
    make_digits.make_digits(again, seed=1, overwrite=True)
    other = json.loads((again / "digits.json").read_text())["parts"]
    mine = json.loads((digits / "digits.json").read_text())["parts"]
    assert other["task/test"]["rows"] != mine["task/test"]["rows"]  # the seed redraws the task's cut ...
    assert other["pretrain"]["rows"] == mine["pretrain"]["rows"]  # ... never the teacher's pre-training part
    assert {k: v for k, v in _tree_digest(again).items() if k.startswith("pretrain/")} == \
        {k: v for k, v in _tree_digest(digits).items() if k.startswith("pretrain/")}  # same pixels, same colours
    assert len(list(again.rglob("*.png"))) == 1797  # the old seed's files are gone


def test_demo_config_builds_the_documented_model():
    name = train_teacher.register_config(CONFIG)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    assert name == "demo-clip" and name in open_clip.list_models()
    assert type(model.visual).__name__ == "ModifiedResNet" and model.visual.preprocess_cfg["size"] == 32
    # open_clip's eval preprocess of a 32-px PNG == the demo's own ToTensor + OpenAI normalisation
    from PIL import Image

    rgb = (np.arange(32 * 32 * 3).reshape(32, 32, 3) % 251).astype(np.uint8)
    ours = train_teacher.normalize(torch.from_numpy(rgb / 255.0).permute(2, 0, 1)[None].float())  # (1, 3, 32, 32)
    torch.testing.assert_close(preprocess(Image.fromarray(rgb))[None], ours, atol=1e-6, rtol=0)


def test_clip_loss_is_clips_loss_for_distinct_labels_and_low_when_aligned():
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)  # (B, D)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * image @ text.T
    target = torch.arange(6)
    expected = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(train_teacher.clip_loss(image, text, scale)["loss"], expected)
    torch.testing.assert_close(train_teacher.clip_loss(image, text, scale, torch.arange(6) + 3)["loss"], expected)
    # two pairs of the same class: each image's target is spread over both captions of its class;
    # with one embedding per class the loss reaches its minimum, the mean entropy of the targets
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    onehot = torch.nn.functional.one_hot(labels, 8).float()  # (B, D), same class = same embedding
    aligned = train_teacher.clip_loss(onehot, onehot, torch.tensor(100.0), labels)["loss"]
    assert abs(aligned.item() - 4 / 6 * np.log(2)) < 1e-4


def test_random_views_keep_shape_range_and_are_seeded():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = train_teacher.random_views(images, torch.Generator().manual_seed(1))
    b = train_teacher.random_views(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0 and not torch.allclose(a, images)
    # the whole image, no rotation: identity, or the exact mirror image with flip = 1
    same = train_teacher.random_views(images, torch.Generator(), scale=(1, 1), ratio=(1, 1), max_rotation=0, flip=0.0)
    mirrored = train_teacher.random_views(images, torch.Generator(), scale=(1, 1), ratio=(1, 1), max_rotation=0, flip=1.0)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    torch.testing.assert_close(mirrored, images.flip(-1), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def short_teacher(digits, tmp_path_factory) -> tuple[Path, dict]:
    """180 steps on 4 images per class with clean captions: ~12 s on one thread."""
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    settings = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.random.get_rng_state()
    record = train_teacher.train_teacher(digits / "pretrain", CONFIG, out, seed=0, epochs=45, batch_size=10, lr=3e-3,
                                         caption_noise=0.0, max_per_class=4, eval_dirs=(digits / "task" / "val",),
                                         threads=1)
    # the caller's torch settings and global RNG are untouched
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == settings[:2]
    assert torch.equal(torch.random.get_rng_state(), settings[2])
    return out, record


def test_short_teacher_training_learns(short_teacher):
    _, record = short_teacher
    losses = record["loss_per_epoch"]
    assert record["num_images"] == 40 and record["noisy_captions"] == 0 and len(losses) == 45
    assert losses[-1] < np.log(10) - 0.4, losses  # well below chance (ln B) for B = 10
    assert record["zero_shot_top1"]["pretrain"] >= 0.3  # chance is 0.1


def test_short_teacher_loads_in_open_clip_and_classifies(short_teacher, digits):
    out, record = short_teacher
    val = str(digits / "task" / "val")
    assert json.loads(out.with_suffix(".json").read_text())["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert set(record["zero_shot_top1"]) == {"pretrain", val}

    # open_clip's own loading path: registered JSON config + local checkpoint file
    name = train_teacher.register_config(CONFIG)
    model = open_clip.create_model(name, pretrained=str(out)).eval()
    assert torch.equal(model.logit_scale, torch.load(out, weights_only=True)["logit_scale"])
    tokenizer = open_clip.get_tokenizer(name)
    images, labels, classnames = train_teacher.load_image_folder(val)
    assert classnames == make_digits.SORTED_CLASSNAMES and len(labels) == 143
    classifier = train_teacher.zero_shot_classifier(model, tokenizer, classnames, train_teacher.TEMPLATES)  # (C, D)
    assert classifier.shape == (10, 64)
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(10))
    preds = train_teacher.zero_shot_predict(model, classifier, images)
    assert (preds == labels).float().mean().item() == pytest.approx(record["zero_shot_top1"][val])


def test_noisy_captions_name_another_class_for_the_given_fraction():
    labels = torch.arange(1000) % 10
    captions = train_teacher.noisy_captions(labels, 10, 0.3, torch.Generator().manual_seed(0))
    wrong = captions != labels
    assert 0.25 < wrong.float().mean().item() < 0.35
    assert captions.min() >= 0 and captions.max() <= 9
    assert torch.equal(train_teacher.noisy_captions(labels, 10, 0.0, torch.Generator().manual_seed(0)), labels)


def test_pruning_the_vocabulary_keeps_every_caption_embedding():
    """The shipped teacher zeroes the token rows no demo caption uses: the captions' embeddings stay exact."""
    name = train_teacher.register_config(CONFIG)
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    tokenizer = open_clip.get_tokenizer(name)
    classes = make_digits.SORTED_CLASSNAMES
    before = train_teacher.zero_shot_classifier(model, tokenizer, classes, train_teacher.TEMPLATES)
    kept = train_teacher.prune_vocabulary(model, tokenizer, classes, train_teacher.TEMPLATES)
    after = train_teacher.zero_shot_classifier(model, tokenizer, classes, train_teacher.TEMPLATES)
    assert torch.equal(before, after)
    rows = model.token_embedding.weight
    assert kept == int((rows.abs().sum(dim=1) > 0).sum()) and 10 < kept < 100 and rows.shape[0] == 49408
