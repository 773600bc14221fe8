"""ToMe at inference (dho.tome, paper Table 9): the merge and the merged towers against an independent restatement of
ToMe's algorithm (written here, calling none of dho's functions), r = 0 bit-identical, the merged model's FLOPs from
its token counts, and the commands (evaluate, predict, export, bench-inference) end to end on tiny ViTs."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_student import make_trained_run
from PIL import Image
from typer.testing import CliRunner

from dho import evaluate as ev
from dho.cli import app
from dho.errors import ConfigError
from dho.inference_bench import bench_inference, count_flops, format_table
from dho.students import build_student, save_student
from dho.tome import ToMeBlocks, ToMeTransformer, apply_tome, bipartite_soft_matching, merge_wavg, proportional_attention

TINY_CLIP = Path(__file__).parent / "assets" / "tiny-clip.json"  # ViT 2 blocks x width 64 (2 heads), 32 px / patch 8: 17 tokens
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*deprecated")


# --------------------------------------------------------------------------------------------
# ToMe restated from the paper (Bolya et al. 2023, §3 and Appendix), one image at a time, in plain loops
# --------------------------------------------------------------------------------------------


def paper_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: tokens x (N, C) of sizes (N,), metric (N, d) -> the merged (N - r', C), (N - r',).
    Alternate the tokens into A (even positions) and B (odd); each A token but the class token (position 0)
    draws an edge to its most similar (cosine) B token; the r most similar edges merge their A token into their
    B token, by the mean weighted by size; out come the remaining A tokens in order, then all B tokens."""
    n = x.shape[0]
    r = min(r, (n - 1) // 2)
    A, B = list(range(0, n, 2)), list(range(1, n, 2))
    cos = lambda i, j: float(metric[i] @ metric[j] / (metric[i].norm() * metric[j].norm()))  # noqa: E731
    edges = []
    for a in A[1:]:
        b = max(B, key=lambda j: cos(a, j))
        edges.append((cos(a, b), a, b))
    edges.sort(key=lambda e: -e[0])
    merged = edges[:r]
    members = {b: [b] for b in B}
    for _, a, b in merged:
        members[b].append(a)
    gone = {a for _, a, _ in merged}
    rows, sizes = [], []
    for a in A:
        if a not in gone:
            rows.append(x[a])
            sizes.append(size[a])
    for b in B:
        s = sum(size[t] for t in members[b])
        rows.append(sum(size[t] * x[t] for t in members[b]) / s)
        sizes.append(s)
    return torch.stack(rows), torch.stack(sizes)


def paper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Proportional attention (ToMe Eq. 1): softmax(q k^T / sqrt(d) + log s) v, for (H, N, d) and sizes (N,)."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + size.log()[None, None, :]  # (H, N, N)
    return logits.softmax(dim=-1) @ v


def paper_block(x, size, r, norm1, qkv, heads, proj, ls1, norm2, mlp, ls2):
    """One image's pre-norm ViT block with ToMe between attention and MLP: x (N, D), sizes (N,)."""
    n, d = x.shape
    q, k, v = qkv(norm1(x)).reshape(n, 3, heads, d // heads).permute(1, 2, 0, 3)  # each (H, N, d_head)
    x = x + ls1(proj(paper_attention(q, k, v, size).transpose(0, 1).reshape(n, d)))
    x, size = paper_merge(x, size, k.mean(dim=0), r)  # metric: the keys, mean over heads
    return x + ls2(mlp(norm2(x))), size


def paper_tower(kind: str, backbone, images: torch.Tensor, r: int) -> torch.Tensor:
    """z of each image through the tower, its blocks restated with ToMe (the tower's own layers, no dho code)."""
    out = []
    for image in images:
        if kind == "open_clip":
            x = backbone._embeds(image[None])[0]  # (N, D): patches + class token + positions, ln_pre
            size = torch.ones(len(x))
            for blk in backbone.transformer.resblocks:
                a = blk.attn
                qkv = lambda h, a=a: F.linear(h, a.in_proj_weight, a.in_proj_bias)  # noqa: E731
                x, size = paper_block(x, size, r, blk.ln_1, qkv, a.num_heads, a.out_proj, blk.ls_1, blk.ln_2, blk.mlp, blk.ls_2)
            pooled, _ = backbone._pool(x[None])
            out.append((pooled @ backbone.proj)[0])
        else:
            x = backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(image[None])))[0]  # (N, D)
            size = torch.ones(len(x))
            for blk in backbone.blocks:
                x, size = paper_block(x, size, r, blk.norm1, blk.attn.qkv, blk.attn.num_heads, blk.attn.proj, blk.ls1,
                                      blk.norm2, blk.mlp, blk.ls2)
            out.append(backbone.forward_head(backbone.norm(x[None]))[0])
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# tiny towers
# --------------------------------------------------------------------------------------------


def _student(kind: str):
    torch.manual_seed(0)
    if kind == "open_clip":
        return build_student(str(TINY_CLIP), 3, init_heads_from_text=False).eval()
    return build_student("timm/test_vit", 3).eval()  # 6 blocks x width 64 (2 heads), 160 px / patch 16: 101 tokens


def _images(student, n: int = 2, seed: int = 0) -> torch.Tensor:
    s = student.preprocess.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _schedule(tokens: int, layers: int, r: int) -> list[int]:
    counts = [tokens]
    for _ in range(layers):
        counts.append(counts[-1] - min(r, (counts[-1] - 1) // 2))
    return counts


# --------------------------------------------------------------------------------------------
# the math
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,r", [(9, 2), (10, 3), (9, 4), (9, 7), (3, 1), (2, 1)])
def test_merge_matches_the_paper_restated(n, r):
    gen = torch.Generator().manual_seed(n * 10 + r)
    x, metric = torch.randn(2, n, 5, generator=gen), torch.randn(2, n, 4, generator=gen)
    size = torch.randint(1, 4, (2, n, 1), generator=gen).float()  # sizes of an earlier merge
    match = bipartite_soft_matching(metric, r)
    if (n - 1) // 2 == 0:
        assert match is None  # nothing to merge: the layer leaves the tokens alone
        return
    got, got_size = merge_wavg(x, size, match)
    for i in range(2):
        want, want_size = paper_merge(x[i], size[i, :, 0], metric[i], r)
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6)
        assert got_size[i, :, 0].tolist() == want_size.tolist()
        assert got[i].shape[0] == n - min(r, (n - 1) // 2)
        torch.testing.assert_close(got[i, 0], x[i, 0])  # the class token stays first, unmerged
    torch.testing.assert_close((got * got_size).sum(1), (x * size).sum(1))  # the size-weighted sum is kept


def test_first_merge_has_unit_sizes_and_the_class_token_is_never_a_source():
    metric = torch.randn(1, 7, 3)
    metric[0, 2] = metric[0, 0] * 3  # token 2 (set A) points where the class token does; the class token never merges
    metric[0, 1] = metric[0, 0]  # ... and so does token 1 (set B): the class token would pick it first
    x = torch.randn(1, 7, 4)
    merged, size = merge_wavg(x, None, bipartite_soft_matching(metric, 1))
    want, want_size = paper_merge(x[0], torch.ones(7), metric[0], 1)
    torch.testing.assert_close(merged[0], want)
    assert size[0, :, 0].tolist() == want_size.tolist() == [1, 1, 1, 2, 1, 1]
    torch.testing.assert_close(merged[0, 3], (x[0, 1] + x[0, 2]) / 2)  # token 2 went into token 1


def test_proportional_attention_is_attention_over_repeated_tokens():
    """A token of size s attends like s copies of itself (why ToMe adds log s): restated by repeating keys/values."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen) for _ in range(3))
    size = torch.tensor([1, 3, 1, 2, 4]).float()
    got = proportional_attention(q, k, v, size[None, :, None])  # (1, 2, 5, 4)
    reps = torch.repeat_interleave(torch.arange(5), size.long())
    plain = torch.softmax(q @ k[:, :, reps].transpose(-1, -2) / 2.0, dim=-1) @ v[:, :, reps]
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], paper_attention(q[0], k[0], v[0], size), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# the towers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,r", [("open_clip", 2), ("open_clip", 8), ("timm", 4), ("timm", 16)])
def test_merged_tower_matches_the_paper_restated(kind, r):
    student = _student(kind)
    x = _images(student)
    with torch.no_grad():
        want = paper_tower(kind, student.backbone, x, r)
    merged = copy.deepcopy(student)
    info = apply_tome(merged, r)
    with torch.no_grad():
        got = merged(x)["z"]
        plain = student(x)["z"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the merge changed something
    tokens = 17 if kind == "open_clip" else 101
    layers = 2 if kind == "open_clip" else 6
    assert info["tokens_per_block"] + [info["tokens_out"]] == _schedule(tokens, layers, r)
    assert info["r"] == r and info["schedule"] == "constant" and info["proportional_attention"] is True
    assert set(merged.state_dict()) == set(student.state_dict())  # the model file's keys do not move


@pytest.mark.parametrize("kind", ["open_clip", "timm"])
def test_r0_is_the_unmerged_model_bit_for_bit(kind):
    student = _student(kind)
    x = _images(student)
    with torch.no_grad():
        plain = student(x)
        same = copy.deepcopy(student)
        info = apply_tome(same, 0)
        got = same(x)
    for key in plain:
        assert torch.equal(got[key], plain[key])
    assert info["tokens_per_block"] == [info["tokens_out"]] * len(info["tokens_per_block"])
    assert [type(m) for m in same.modules()] == [type(m) for m in student.modules()]  # nothing was rewritten
    # the merged blocks' own attention (recomputed from the blocks' weights), merging nothing, is the tower's
    forced = copy.deepcopy(student)
    if kind == "open_clip":
        forced.backbone.transformer = ToMeTransformer(ToMeBlocks(list(forced.backbone.transformer.resblocks), 0, kind))
    else:
        forced.backbone.blocks = ToMeBlocks(list(forced.backbone.blocks), 0, kind)
    with torch.no_grad():
        torch.testing.assert_close(forced(x)["z"], plain["z"], rtol=1e-5, atol=1e-6)


def _hand_macs(tokens: list[int], width: int, head_dim: int, mlp: int, patches: int, patch: int, out: int) -> int:
    """Multiply-accumulates of a ViT with `tokens[l]` tokens entering block l: attention on n, the matching's
    |A| x |B| cosines of d_head, the MLP on the n' left after the merge; + patch embedding and output projection."""
    total = patches * width * 3 * patch * patch + width * out
    for n, m in zip(tokens, tokens[1:]):
        total += n * width * 3 * width + 2 * n * n * width + n * width * width  # qkv, q k^T and attn v, out projection
        if m < n:
            total += math.ceil(n / 2) * (n // 2) * head_dim  # the bipartite matching's scores
        total += 2 * m * width * mlp  # MLP on the merged tokens
    return total


@pytest.mark.parametrize("kind,r", [("open_clip", 0), ("open_clip", 3), ("timm", 0), ("timm", 8)])
def test_flop_count_of_the_merged_tower_follows_its_token_counts(kind, r):
    student = _student(kind)
    merged = copy.deepcopy(student)
    apply_tome(merged, r)
    x = _images(student, n=1)
    if kind == "open_clip":  # MLP ratio 4, a 64 -> 32 output projection
        tokens, layers, mlp, out, patches, patch = 17, 2, 256, 32, 16, 8
    else:  # MLP ratio 3, no projection (num_classes=0)
        tokens, layers, mlp, out, patches, patch = 101, 6, 192, 0, 100, 16
    want = _hand_macs(_schedule(tokens, layers, r), 64, 32, mlp, patches, patch, out)
    assert count_flops(merged.backbone, x) == 2 * want


# --------------------------------------------------------------------------------------------
# the commands
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, tiny_dataset) -> Path:
    """A tiny-clip ViT student run for the tiny dataset's classes (random weights; heads from alpha 0.3, beta 1)."""
    torch.manual_seed(0)
    student = build_student(str(TINY_CLIP), tiny_dataset.num_classes, init_heads_from_text=False)
    run = tmp_path_factory.mktemp("tome") / "clip-run"
    save_student(run / "model.pt", student, tiny_dataset.classnames, alpha=0.3, beta=1.0)
    return run


def test_evaluate_records_tome_and_r0_scores_as_without(clip_run, tiny_dataset):
    base = ev.evaluate(clip_run, tiny_dataset.root, device="cpu", workers=0)
    zero = ev.evaluate(clip_run, tiny_dataset.root, device="cpu", workers=0, tome_r=0)
    assert "tome" not in base and zero["tome"]["r"] == 0
    assert {k: v for k, v in zero.items() if k != "tome"} == base
    result = CliRunner().invoke(app, ["evaluate", str(clip_run), "--data", str(tiny_dataset.root), "--tome-r", "4",
                                      "--device", "cpu", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    merged = json.loads(result.output)
    assert merged["tome"]["r"] == 4 and merged["tome"]["tokens_per_block"] == [17, 13] and merged["tome"]["tokens_out"] == 9
    student, meta = ev.load_run(clip_run, "cpu", tome_r=4)
    ce, kd, labels = ev.collect_logits(student, tiny_dataset, device="cpu", workers=0)
    assert merged["combined"] == ev.head_metrics(ce, kd, labels, 0.3, 1.0)["combined"]


def test_predict_with_tome(clip_run, tiny_dataset):
    files = sorted((tiny_dataset.root.parent / "images" / "class_0").iterdir())[:2]
    got = ev.predict(clip_run, files, topk=3, device="cpu", tome_r=3)
    student, meta = ev.load_run(clip_run, "cpu", tome_r=3)
    x = torch.stack([meta["preprocess"].eval_view(ev.load_image(f)) for f in files])
    want = ev.head_probs(student, x, 0.3, 1.0)["combined"]
    for (path, top), probs in zip(got, want):
        assert [p for _, p in top] == pytest.approx(probs.topk(3).values.tolist())


STANDALONE = r"""
import json, sys
import torch
fmt, path, images = sys.argv[1], sys.argv[2], torch.load(sys.argv[3])
if fmt == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    probs = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
else:
    model = torch.export.load(path).module() if fmt == "pt2" else torch.jit.load(path)
    with torch.no_grad():
        probs = model(images)
print(json.dumps({"probs": probs.tolist(), "dho_imported": any(m == "dho" or m.startswith("dho.") for m in sys.modules)}))
"""


@pytest.mark.parametrize("fmt,suffix", [("pt2", "pt2"), ("torchscript", "ts"),
                                        pytest.param("onnx", "onnx", marks=pytest.mark.slow)])
def test_export_with_tome_runs_without_dho(clip_run, tmp_path, fmt, suffix):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    result = CliRunner().invoke(app, ["export", str(clip_run), "--out", str(tmp_path / f"m.{suffix}"), "--tome-r", "3"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / f"m.{suffix}.json").read_text())["tome"]["r"] == 3
    images = torch.randint(0, 256, (2, 3, 45, 61), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    torch.save(images, tmp_path / "images.pt")
    proc = subprocess.run([sys.executable, "-c", STANDALONE, fmt, str(tmp_path / f"m.{suffix}"), str(tmp_path / "images.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dho_imported"] is False
    student, meta = ev.load_run(clip_run, "cpu", tome_r=3)
    plain, _ = ev.load_run(clip_run, "cpu")
    views = torch.stack([meta["preprocess"].eval_view(Image.fromarray(x.permute(1, 2, 0).numpy())) for x in images])
    want = ev.head_probs(student, views, 0.3, 1.0)["combined"]
    unmerged = ev.head_probs(plain, views, 0.3, 1.0)["combined"]
    torch.testing.assert_close(torch.tensor(out["probs"]), want, atol=5e-3, rtol=0)
    assert (torch.tensor(out["probs"]) - unmerged).abs().max() > (torch.tensor(out["probs"]) - want).abs().max()


def test_tome_refusals_are_one_line(clip_run, tiny_dataset, tmp_path):
    cnn = make_trained_run(tmp_path / "cnn", tiny_dataset, steps=1)
    cases = [
        (["evaluate", str(cnn), "--data", str(tiny_dataset.root), "--tome-r", "2"], "resnet-tiny' is a torchvision CNN"),
        (["export", str(clip_run), "--out", str(tmp_path / "hf"), "--format", "hf", "--tome-r", "2"], "hf folder holds the weights"),
        (["predict", str(clip_run), str(tiny_dataset.root.parent / "images" / "class_0"), "--tome-r", "-1"], "--tome-r"),
    ]
    for args, match in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0 and isinstance(result.exception, ConfigError), result.output
        assert match in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "hf").exists()
    student = _student("timm")
    student.backbone.global_pool = "avg"
    with pytest.raises(ConfigError, match="pools by 'avg'"):
        apply_tome(student, 2)
    student = _student("open_clip")
    apply_tome(student, 2)
    with pytest.raises(ConfigError, match="already applied"):
        apply_tome(student, 2)


def test_bench_inference_measures_tome_beside_the_student(clip_run, tiny_dataset):
    result = bench_inference(clip_run, batch_sizes=(1, 4), device="cpu", teacher=False, warmup=1, iters=2,
                             min_seconds=0.0, tome_r=4, data=tiny_dataset.root, workers=0)
    models = result["models"]
    assert list(models) == ["student", "student_tome", "single_head"]
    heads = 2 * 32 * tiny_dataset.num_classes * 2  # both linear heads, FLOPs
    assert models["student"]["flops"] == 2 * _hand_macs([17, 17, 17], 64, 32, 256, 16, 8, 32) + heads
    assert models["student_tome"]["flops"] == 2 * _hand_macs([17, 13, 9], 64, 32, 256, 16, 8, 32) + heads
    assert models["student_tome"]["params"] == models["student"]["params"]
    t = result["ratios"]["tome_over_student_pct"]
    assert t["gflops"] == pytest.approx(100 * (models["student_tome"]["flops"] / models["student"]["flops"] - 1))
    assert set(t["images_per_s"]) == {"1", "4"} and result["tome"]["r"] == 4
    want = ev.evaluate(clip_run, tiny_dataset.root, device="cpu", workers=0, tome_r=4)
    assert models["student_tome"]["accuracy"]["combined"] == want["combined"]
    assert models["student"]["accuracy"]["combined"] == ev.evaluate(clip_run, tiny_dataset.root, device="cpu", workers=0)["combined"]
    assert t["top1_points"] == pytest.approx(want["combined"]["top1"] - models["student"]["accuracy"]["combined"]["top1"])
    table = format_table(result)
    assert "ToMe r=4 over DHO: FLOPs" in table and "top-1" in table and "tokens per block 17 -> 9" in table
