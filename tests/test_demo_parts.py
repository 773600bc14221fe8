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

from dho.errors import ConfigError, DatasetError

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
    make_digits.make_digits(out, seed=0, scene="cluttered")
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
        renders = make_digits.PRETRAIN_RENDERS if part == "pretrain" else 1
        assert (renders * per_class).tolist() == summary["parts"][part]["per_class"]
        assert sorted(rows) == summary["parts"][part]["rows"]
        assert len(list((digits / part).rglob("*.png"))) == renders * len(rows)
    assert seen == set(range(len(labels)))  # 1797 digits, each in exactly one part
    sizes = {p: summary["parts"][p]["num_samples"] for p in make_digits.PARTS}
    assert sizes == {"pretrain": 629 * make_digits.PRETRAIN_RENDERS, "task/train": 809, "task/val": 143, "task/test": 216}
    assert summary["scene"] == "cluttered"


def test_make_digits_images_are_32px_rgb_and_byte_identical_per_seed(digits, tmp_path):
    from PIL import Image

    image = Image.open(next((digits / "task" / "test" / "seven").glob("*.png")))
    assert image.size == (32, 32) and image.mode == "RGB"
    pixels = np.asarray(image, dtype=np.int64)  # (32, 32, 3)
    assert pixels.max() - pixels.min() > 80  # ink on paper, not a flat image
    assert not np.array_equal(pixels[..., 0], pixels[..., 1])  # tinted, channels differ

    again = tmp_path / "again"
    make_digits.make_digits(again, seed=0, scene="cluttered")
    assert _tree_digest(again) == _tree_digest(digits)
    with pytest.raises(DatasetError, match="overwrite"):
        make_digits.make_digits(again, seed=1, scene="cluttered")
    make_digits.make_digits(again, seed=1, overwrite=True, scene="cluttered")
    other = json.loads((again / "digits.json").read_text())["parts"]
    mine = json.loads((digits / "digits.json").read_text())["parts"]
    assert other["task/test"]["rows"] != mine["task/test"]["rows"]  # the seed redraws the task's cut ...
    assert other["pretrain"]["rows"] == mine["pretrain"]["rows"]  # ... never the teacher's pre-training part
    assert {k: v for k, v in _tree_digest(again).items() if k.startswith("pretrain/")} == \
        {k: v for k, v in _tree_digest(digits).items() if k.startswith("pretrain/")}  # same pixels, same colours
    assert len(list(again.rglob("*.png"))) == 1797 + 629 * (make_digits.PRETRAIN_RENDERS - 1)  # the old seed's files are gone


def test_the_cluttered_scene_moves_scales_and_recolours_the_digit_and_the_plain_scene_stays(digits, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    x = load_digits().data
    boxes, inks = [], []
    for r in range(40):  # the same digit row rendered 40 times: the scene draws anew each time
        rng = np.random.default_rng([make_digits.PRETRAIN_SEED, 2, 7, r])
        side = int(rng.integers(make_digits.SIZE_RANGE[0], make_digits.SIZE_RANGE[1] + 1))
        x0, y0 = rng.integers(0, 32 - side + 1, size=2)
        boxes.append((side, int(x0), int(y0)))
        image = np.asarray(make_digits.render_cluttered(x[7], np.random.default_rng([make_digits.PRETRAIN_SEED, 2, 7, r])))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        inks.append(image.reshape(-1, 3).mean(axis=0))
    sides = [b[0] for b in boxes]
    assert min(sides) < 17 and max(sides) > 21 and len({b[1:] for b in boxes}) > 30  # sizes and places vary
    assert np.std(inks, axis=0).min() > 10  # colours vary
    a = make_digits.render_cluttered(x[7], np.random.default_rng([0, 2, 7, 0]))
    assert np.array_equal(np.asarray(a), np.asarray(make_digits.render_cluttered(x[7], np.random.default_rng([0, 2, 7, 0]))))
    names = {p.name for p in (digits / "pretrain").rglob("*.png")}
    assert {n.rsplit("-r", 1)[1] for n in names} == {f"{r}.png" for r in range(make_digits.PRETRAIN_RENDERS)}

    plain = tmp_path / "plain"
    summary = make_digits.make_digits(plain, seed=0, scene="plain")
    assert summary["scene"] == "plain" and summary["parts"]["pretrain"]["num_samples"] == 629
    image = np.asarray(Image.open(next((plain / "task" / "test" / "seven").glob("*.png"))), dtype=np.int64)
    assert image.shape == (32, 32, 3) and image.max() - image.min() > 80
    with pytest.raises(ConfigError, match="unknown scene"):
        make_digits.make_digits(tmp_path / "x", scene="photo")


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
def plain_digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain-digits")
    make_digits.make_digits(out, seed=0, scene="plain")
    return out


@pytest.fixture(scope="module")
def short_teacher(plain_digits, tmp_path_factory) -> tuple[Path, dict]:
    """180 steps on 4 plain images per class with clean captions: ~12 s on one thread (the training's mechanics;
    the cluttered scene needs the full pre-training part to learn)."""
    digits = plain_digits
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


def test_short_teacher_loads_in_open_clip_and_classifies(short_teacher, plain_digits):
    out, record = short_teacher
    digits = plain_digits
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


def test_outside_baselines_read_the_task_images_pixels_and_are_near_chance_on_the_cluttered_scene(digits, plain_digits, tmp_path):
    """outside.py fits scikit-learn on the images the students see: the cluttered PNGs' 3072 raw values (near chance
    from 65 labels), the 64 load_digits() intensities for the plain scene (as first recorded)."""
    import subprocess

    from PIL import Image

    outside = _load("outside")
    summary = json.loads((digits / "digits.json").read_text())
    rows = np.array(summary["parts"]["task/test"]["rows"][:5])
    pixels = outside.task_pixels(digits, rows)  # (5, 3072)
    for r, row in zip(rows, pixels):
        f = next((digits / "task" / "test").glob(f"*/digit-{r:04d}.png"))
        assert np.array_equal(row, np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).reshape(-1) / 255.0)
    results = {}
    for scene, root in (("cluttered", digits), ("plain", plain_digits)):
        ds = tmp_path / scene
        for cmd in (["prepare", str(root / "task" / "train"), "--out", str(ds / "train"), "--shard-size", "64", "--seed", "0"],
                    ["split", str(ds / "train"), "--out", str(ds / "labeled"), "--percent", "8", "--seed", "0", "--shard-size", "16"]):
            proc = subprocess.run([sys.executable, "-m", "dho", *cmd], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-2000:]
        results[scene] = outside.outside_baselines(root / "digits.json", ds / "labeled")
    assert results["cluttered"]["features"] == 3072 and results["plain"]["features"] == 64
    assert results["cluttered"]["num_labeled"] == results["plain"]["num_labeled"] == 65  # the same split either way
    assert results["cluttered"]["svc_labeled"] < 25 < 80 < results["plain"]["svc_labeled"]  # chance is 10
