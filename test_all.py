"""The test suite: small, CPU-only (the CUDA tests are skipped elsewhere), one invariant per test, against a
reference computed another way. A section per file, in the README's order. Run: python -m pytest -q test_all.py"""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import bench
import checkpoint
import config
import data
import eval_knn
import export
import figures
import losses
import machine
import models
import monitor
import train
from ema import ema_update, make_target, momentum_at
from losses import jepa_loss, sigreg, vicreg_loss
from masks import apply_masks, sample_masks
from monitor import Monitor, collapse_stats, collapse_suspected, token_share


# ------------------------------------------------------------ shared helpers: tiny settings, image folders, runs

HERE = os.path.dirname(os.path.abspath(__file__))


TINY = ["--model", "vit_tiny", "--img-size", "32", "--patch-size", "8", "--pred-depth", "1", "--pred-dim", "48",
        "--min-keep", "4", "--workers", "0", "--dtype", "float32", "--log-every", "1"]
# Tests whose invariant holds in float32 alone (tolerances measured in it, features compared with float32 ones) say so
# again: the suite also passes with TINY's --dtype taken out, each run then measuring its precision as a user's does
FLOAT32 = ["--dtype", "float32"]


# Tests that demand bit-equal weights train with --deterministic: on a GPU, float32 attention and convolution
# backward kernels add with atomics in a varying order (the CPU repeats without it, and costs nothing with it)
EXACT = ["--deterministic"]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


NO_STEP = ["--lr", "0", "--start-lr", "0", "--final-lr", "0"]  # the same run with every update zero: its start


@pytest.fixture(autouse=True)
def deterministic_mode_off_after_each_test():  # --deterministic sets a process-wide mode; train.main runs in-process
    yield
    torch.use_deterministic_algorithms(False)


def make_folder(root, n_per_class=6, classes=("a", "b"), seed=0):
    """A tiny ImageFolder of mixed sizes and modes: RGB, grayscale and RGBA, JPEG and PNG."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n_per_class):
            w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
            img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            if i % 3 == 1:
                img.convert("L").save(os.path.join(root, c, f"{i}.jpg"))
            elif i % 3 == 2:
                img.convert("RGBA").save(os.path.join(root, c, f"{i}.png"))
            else:
                img.save(os.path.join(root, c, f"{i}.jpg"))
    return root


def knn_folder(root):
    """train/ and val/ with two classes that differ in brightness."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for c, level in (("dark", 40), ("light", 210)):
            os.makedirs(os.path.join(root, split, c))
            for i in range(n):
                px = np.clip(level + rng.normal(0, 10, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(os.path.join(root, split, c, f"{i}.png"))
    return root


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_train(*args, **kw):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], cwd=HERE, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def log_rows(path):
    """log.csv's header and rows without its img_per_s column (a timing, different in every run), and without its
    "# ..." lines (the machine, and where a run was resumed)."""
    return [row[:6] + row[7:] for row in csv.reader(line for line in open(path) if not line.startswith("#"))]


def csv_rows(path):
    """log.csv's rows as dicts, its "# ..." lines left out."""
    return list(csv.DictReader(line for line in open(path) if not line.startswith("#")))


def assert_trained_alike(a, b, start, parts):
    """Two runs that took the same steps with sums in another order (DDP against one process, other thread
    counts) end with weights that differ by rounding alone. Judged against how far training moved them (b - start),
    which no core count changes: the whole model within 1e-4 of it, every tensor within 1e-2 (measured with 1 to 32
    threads: 1e-5 and 7e-4 after 3 steps, 5e-7 and 7e-5 after 40). A per-element tolerance fails on more cores."""
    moved, off = 0.0, 0.0
    for part in parts:
        for k, v in b[part].items():
            if v.is_floating_point():
                d, m = (a[part][k] - v).norm().item(), (v - start[part][k]).norm().item()
                assert d <= 1e-2 * m or d == 0, (part, k, d, m)
                moved, off = moved + m**2, off + d**2
    assert off <= 1e-8 * moved and moved > 0, (off, moved)


def code_block(text, first_line):
    """The indented (docstring) or fenced (README) block of `text` that begins with first_line, dedented."""
    lines = text.split("\n")
    start = lines.index(first_line)
    indent = len(first_line) - len(first_line.lstrip())
    block = []
    for line in lines[start:]:
        if line.startswith("```") or (line.strip() and len(line) - len(line.lstrip()) < indent):
            break
        block.append(line[indent:])
    return "\n".join(block).strip() + "\n"


def run_alone(tmp_path, files, code):
    """Run `code` in an empty folder that holds copies of `files` only, with numpy and Pillow unimportable, as a
    copy-paster's project would -> its stdout (an error fails the test with its stderr)."""
    folder = tmp_path / "alone"
    folder.mkdir()
    for f in files:
        (folder / f).write_text(open(os.path.join(HERE, f)).read())
    (folder / "run.py").write_text("import sys\nsys.modules.update(numpy=None, PIL=None)  # unimportable\n" + code)
    r = subprocess.run([sys.executable, "-W", "ignore", "run.py"], cwd=folder, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
    return r.stdout


def stop_after(monkeypatch, steps):
    """Make train.main stop as on SIGTERM after `steps` more steps (stop_requested is asked once a step)."""
    asked = iter(range(1, 10**6))
    monkeypatch.setattr(checkpoint, "stop_requested", lambda signals, device: next(asked) >= steps)


def tiny_encoder(img_size=32, patch_size=4, depth=2):
    return models.VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=48, depth=depth,
                                    num_heads=3)


def tiny_predictor(grid=(8, 8), depth=2):
    return models.VisionTransformerPredictor(num_patches=grid[0] * grid[1], embed_dim=48, predictor_embed_dim=24,
                                             depth=depth, num_heads=3, grid=grid)


# ----------------------------------------------------------------------------------------------------- models.py

def test_encoder_shapes_full_and_masked():
    enc, x = tiny_encoder(), torch.randn(2, 3, 32, 32)
    assert enc(x).shape == (2, 64, 48)
    assert enc(x, torch.tensor([[0, 5, 63], [1, 2, 3]])).shape == (2, 3, 48)


def test_encoder_non_square_and_other_resolution():
    enc = tiny_encoder(img_size=(16, 32))
    assert enc.grid == (4, 8) and enc(torch.randn(1, 3, 16, 32)).shape == (1, 32, 48)
    assert enc(torch.randn(1, 3, 32, 48)).shape == (1, 96, 48)  # resized position table


def test_predictor_shapes():
    pred = tiny_predictor()
    mc, mt = sample_masks(3, 8, generator=torch.Generator().manual_seed(0))
    out = pred(torch.randn(3, mc.shape[1], 48), mc, mt)
    assert out.shape == (3, 4, mt.shape[2], 48)


def test_attention_module_matches_float64_reference_per_head():
    torch.manual_seed(0)
    attn, x = models.Attention(48, num_heads=3), torch.randn(2, 7, 48)
    W, b = attn.qkv.weight.double(), attn.qkv.bias.double()
    qkv = x.double() @ W.T + b  # (2, 7, 144): q, k, v side by side, each split into 3 heads of 16
    heads = []
    for h in range(3):  # one head at a time, softmax by hand
        q, k, v = (qkv[..., i * 48 + h * 16:i * 48 + (h + 1) * 16] for i in range(3))
        scores = q @ k.transpose(-2, -1) / math.sqrt(16)
        weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
        heads.append(weights @ v)
    expected = torch.cat(heads, -1) @ attn.proj.weight.double().T + attn.proj.bias.double()
    torch.testing.assert_close(attn(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_cpu_attention_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 11, 16).unbind(0)
    torch.testing.assert_close(models.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_sincos_table_values():
    dim, H, W = 16, 3, 5
    table = models.sincos_pos_embed(dim, H, W)
    omega = [1 / 10000 ** (k / 4) for k in range(4)]
    for r in range(H):
        for c in range(W):
            row = table[r * W + c].tolist()
            expected = ([math.sin(c * o) for o in omega] + [math.cos(c * o) for o in omega]
                        + [math.sin(r * o) for o in omega] + [math.cos(r * o) for o in omega])
            assert row == pytest.approx(expected, abs=1e-6)


def test_pos_embed_resize_keeps_rows_and_columns_apart():
    # channel 0 holds the row index, channel 1 the column: a resize that assumed a cls token (or
    # mixed up the layout) would shift values between rows
    H, W = 4, 6
    rows, cols = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    table = torch.stack([rows.flatten(), cols.flatten()], dim=1).unsqueeze(0)  # (1, H*W, 2)
    out = models.resize_pos_embed(table, (H, W), (H, 2 * W)).reshape(H, 2 * W, 2)
    torch.testing.assert_close(out[..., 0], rows[:, :1].expand(H, 2 * W))
    assert models.resize_pos_embed(table, (H, W), (H, W)) is table


def test_pos_embed_resize_interpolates_bicubically():
    # against cubic convolution written out (Keys' kernel with a = -0.75, as PyTorch and the official code's
    # F.interpolate, half-pixel centres, edges clamped), on a row of arbitrary values resized to twice the width
    def kernel(x, a=-0.75):
        x = abs(x)
        return (a + 2) * x**3 - (a + 3) * x**2 + 1 if x <= 1 else (a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
                                                                     if x < 2 else 0.0)
    H, W = 2, 8
    values = [0.0, 1, 4, 2, 7, 3, 3, 5]
    table = torch.stack([torch.tensor(values).repeat(H), torch.zeros(H * W)], dim=1).unsqueeze(0)  # (1, H*W, 2)
    out = models.resize_pos_embed(table, (H, W), (H, 2 * W)).reshape(H, 2 * W, 2)
    expected = []
    for j in range(2 * W):
        src = (j + 0.5) / 2 - 0.5  # output column j samples input column src
        first = math.floor(src)
        expected.append(sum(kernel(src - (first + m)) * values[min(max(first + m, 0), W - 1)] for m in (-1, 0, 1, 2)))
    torch.testing.assert_close(out[1, :, 0], torch.tensor(expected), atol=1e-5, rtol=0)


def test_official_parameter_names():
    enc = models.vit_tiny(img_size=32, patch_size=4)
    keys = set(enc.state_dict())
    for name in ["pos_embed", "patch_embed.proj.weight", "blocks.11.norm1.weight", "blocks.0.attn.qkv.bias",
                 "blocks.0.attn.proj.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
                 "blocks.0.mlp.fc2.bias", "norm.weight"]:
        assert name in keys
    pred = tiny_predictor()
    assert {"predictor_embed.weight", "mask_token", "predictor_pos_embed", "predictor_blocks.1.attn.qkv.weight",
            "predictor_norm.weight", "predictor_proj.bias"} <= set(pred.state_dict())


@pytest.mark.parametrize("name, dim, depth, heads", [("vit_tiny", 192, 12, 3), ("vit_small", 384, 12, 6),
                                                     ("vit_base", 768, 12, 12), ("vit_giant", 1408, 40, 16)])
def test_factory_configs(name, dim, depth, heads):
    cfg = models.VIT_CONFIGS[name]
    assert (cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == (dim, depth, heads)
    if name == "vit_giant":  # the official MLP width 6144 = 1408 * 48 / 11, read from the config, not built
        assert int(cfg["embed_dim"] * cfg["mlp_ratio"]) == 6144


def test_residual_projections_rescaled_by_depth():
    torch.manual_seed(0)
    enc = models.VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=8, num_heads=3)
    first, last = enc.blocks[0].mlp.fc2.weight.detach().std(), enc.blocks[7].mlp.fc2.weight.detach().std()
    assert float(first / last) == pytest.approx(math.sqrt(8), rel=0.05)
    assert float(enc.blocks[0].attn.qkv.weight.detach().std()) == pytest.approx(0.02, rel=0.05)


def reference_forward(enc, pred, x, mc, mt):
    """The official computation written out naively: explicit softmax attention, the batch repeated
    once per target block (mask-major, as the official predictor) and per-block masks as a list."""
    def block(blk, h):
        B, T, C = h.shape
        nh = blk.attn.num_heads
        q, k, v = blk.attn.qkv(blk.norm1(h)).reshape(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * (C // nh) ** -0.5).softmax(-1)
        h = h + blk.attn.proj((a @ v).transpose(1, 2).reshape(B, T, C))
        return h + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(h))))

    def gather(t, idx):  # python loop over images
        return torch.stack([t[b, idx[b]] for b in range(len(idx))])

    h = gather(enc.patch_embed.proj(x).flatten(2).transpose(1, 2) + enc.pos_embed, mc)
    for blk in enc.blocks:
        h = block(blk, h)
    z = enc.norm(h)
    B, Kc = mc.shape
    pos = pred.predictor_pos_embed.repeat(B, 1, 1)
    ctx = pred.predictor_embed(z) + gather(pos, mc)
    seqs = torch.cat([torch.cat([ctx, pred.mask_token + gather(pos, mt[:, m])], dim=1) for m in range(mt.shape[1])])
    for blk in pred.predictor_blocks:
        seqs = block(blk, seqs)
    out = pred.predictor_proj(pred.predictor_norm(seqs)[:, Kc:])  # (M*B, Kt, D), mask-major
    return out.reshape(mt.shape[1], B, mt.shape[2], -1).transpose(0, 1)


def test_model_matches_naive_reference():
    torch.manual_seed(0)
    enc, pred = tiny_encoder(depth=3), tiny_predictor(depth=3)
    x = torch.randn(3, 3, 32, 32)
    mc, mt = sample_masks(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = pred(enc(x, mc), mc, mt), reference_forward(enc, pred, x, mc, mt)
    assert (ours - ref).abs().max() < 1e-4


def test_prefixed_state_dict_loads_and_gives_same_outputs():
    enc, other = tiny_encoder(), tiny_encoder()
    prefixed = {"module." + k: v for k, v in enc.state_dict().items()}
    other.load_state_dict({k.removeprefix("module."): v for k, v in prefixed.items()})
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(enc(x), other(x))


# ------------------------------------------------------------------------------------------------------ masks.py

def test_apply_masks_matches_python_loop():
    x = torch.randn(3, 10, 4)
    idx2 = torch.randint(0, 10, (3, 5))
    idx3 = torch.randint(0, 10, (3, 2, 5))
    assert torch.equal(apply_masks(x, idx2), torch.stack([x[b, idx2[b]] for b in range(3)]))
    loop = torch.stack([torch.stack([x[b, idx3[b, m]] for m in range(2)]) for b in range(3)])
    assert torch.equal(apply_masks(x, idx3), loop)


def many_masks(n_batches=30, batch=16, grid=(14, 14), **kw):
    g = torch.Generator().manual_seed(0)
    return [sample_masks(batch, grid, generator=g, **kw) for _ in range(n_batches)]


def test_targets_are_full_rectangles_in_range():
    for mc, mt in many_masks(grid=(10, 14)):
        assert mc.min() >= 0 and mc.max() < 140 and mt.min() >= 0 and mt.max() < 140
        rows, cols = mt // 14, mt % 14
        h = int(rows[0, 0].max() - rows[0, 0].min() + 1)
        w = int(cols[0, 0].max() - cols[0, 0].min() + 1)
        assert mt.shape[2] == h * w  # a full h x w rectangle, same size for the whole batch
        assert torch.equal(rows.amax(-1) - rows.amin(-1) + 1, torch.full(rows.shape[:2], h))
        assert torch.equal(cols.amax(-1) - cols.amin(-1) + 1, torch.full(cols.shape[:2], w))


def test_target_size_within_scale_and_aspect():
    for mc, mt in many_masks():
        rows, cols = mt[0, 0] // 14, mt[0, 0] % 14
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert 0.15 * 196 - 4 <= h * w <= 0.2 * 196 + 4  # rounding h and w to integers
        assert 0.75 - 0.3 <= h / w <= 1.5 + 0.3


def test_mask_block_aspect_is_height_over_width():
    for aspect, tall in (((2.0, 3.0), True), ((1 / 3, 1 / 2), False)):
        for mc, mt in many_masks(n_batches=10, target_aspect=aspect, target_scale=(0.2, 0.3)):
            rows, cols = mt[0, 0] // 14, mt[0, 0] % 14
            h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert (h > w) == tall, (aspect, h, w)  # h/w in [2, 3]: tall blocks; in [1/3, 1/2]: wide ones


def test_context_disjoint_from_targets_and_sorted_unique():
    for mc, mt in many_masks():
        for b in range(len(mc)):
            assert not set(mc[b].tolist()) & set(mt[b].flatten().tolist())
            assert torch.equal(mc[b], torch.unique(mc[b]))  # sorted, no repeats


def test_overlap_allowed_when_asked():
    overlaps = [bool(set(mc[b].tolist()) & set(mt[b].flatten().tolist()))
                for mc, mt in many_masks(allow_overlap=True) for b in range(len(mc))]
    assert all(overlaps)


def test_context_lengths_equal_and_at_least_min_keep():
    for mc, mt in many_masks(min_keep=20):
        assert mc.dim() == 2 and mc.shape[1] >= 20


def test_last_row_and_column_reachable():
    covered = torch.zeros(196, dtype=torch.bool)
    for mc, mt in many_masks(n_batches=10):
        covered[mt.flatten()] = True
    grid = covered.reshape(14, 14)
    assert grid[13].any() and grid[:, 13].any() and grid[13, 13]


def test_context_has_no_top_bias():
    # The official truncation keeps the first Kc sorted indices, so its context sits high in the
    # image. Ours keeps a uniform subset: the mean row of kept context patches stays near the middle.
    rows = torch.cat([(mc // 14).float().flatten() for mc, _ in many_masks(n_batches=40)])
    assert abs(rows.mean().item() - 6.5) < 0.5


def test_deterministic_under_seeded_generator():
    a = sample_masks(8, 14, generator=torch.Generator().manual_seed(3))
    b = sample_masks(8, 14, generator=torch.Generator().manual_seed(3))
    c = sample_masks(8, 14, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


def test_terminates_on_tiny_grid():
    # 32 px with patch 4 (8x8 grid) and min_keep 10: the official sampler loops forever here
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        mc, mt = sample_masks(16, 8, min_keep=10, generator=g)
        assert mc.shape[1] >= 10
    with pytest.raises(ValueError, match="min_keep"):
        # 8-patch targets on a 4x4 grid can never leave 10 context patches: retried, then refused
        sample_masks(4, 4, target_scale=(0.5, 0.5), min_keep=10)
    with pytest.raises(ValueError, match="min_keep"):
        sample_masks(4, 8, min_keep=65)


@pytest.mark.parametrize("kw", [dict(target_scale=(0.0, 0.2)), dict(context_scale=(0.5, 1.5)),
                                dict(target_aspect=(2.0, 1.0)), dict(num_targets=0)])
def test_bad_mask_settings_raise(kw):
    with pytest.raises(ValueError):
        sample_masks(2, 8, **kw)


def test_complement_context_is_exactly_outside_the_targets():
    for seed in range(10):
        ctx, tgt = sample_masks(16, (8, 8), num_targets=8, target_scale=(0.15, 0.15), context="complement",
                                min_keep=4, generator=torch.Generator().manual_seed(seed))
        again = sample_masks(16, (8, 8), num_targets=8, target_scale=(0.15, 0.15), context="complement",
                             min_keep=4, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ctx, again[0]) and torch.equal(tgt, again[1])  # deterministic
        sizes = []
        for b in range(16):
            outside = set(range(64)) - set(tgt[b].flatten().tolist())
            assert set(ctx[b].tolist()) <= outside  # disjoint from every target
            sizes.append(len(outside))
        assert ctx.shape[1] == min(sizes)  # the image with the fewest free patches keeps all of them
    with pytest.raises(ValueError, match="min_keep"):  # targets that cover everything: an error, not a hang
        sample_masks(4, (4, 4), num_targets=8, target_scale=(0.9, 1.0), context="complement", min_keep=2,
                     generator=torch.Generator().manual_seed(0))


# -------------------------------------------------------------------------------------------------------- ema.py

def test_ema_update_arithmetic_and_frozen_target():
    online = tiny_encoder()
    target = make_target(online)
    assert not any(p.requires_grad for p in target.parameters())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        online.pos_embed.add_(1.0)  # a buffer: copied, not averaged
    ema_update(target, online, 0.9)
    online_sd = online.state_dict()
    for k, v in target.state_dict().items():
        expected = 0.9 * before[k] + 0.1 * online_sd[k] if k != "pos_embed" else online_sd[k]
        torch.testing.assert_close(v, expected)


def test_momentum_ramp_values():
    assert momentum_at(0, 100) == pytest.approx(0.996)
    assert momentum_at(50, 100) == pytest.approx(0.998)
    assert momentum_at(100, 100) == pytest.approx(1.0)
    assert momentum_at(200, 100) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------- losses.py

@pytest.mark.parametrize("kind", ["smooth_l1", "l2", "cosine"])
def test_loss_zero_on_equal_and_no_gradient_to_target(kind):
    pred = torch.randn(2, 4, 5, 8, requires_grad=True)
    target = pred.detach().clone().requires_grad_(True)
    assert jepa_loss(pred, target.detach(), kind).item() == pytest.approx(0.0, abs=1e-6)
    jepa_loss(pred, torch.randn(2, 4, 5, 8) + target, kind).backward()
    assert target.grad is None and pred.grad is not None and pred.grad.abs().sum() > 0


def test_loss_kinds_hand_worked_values():
    pred, target = torch.tensor([[0.5, 2.0]]), torch.zeros(1, 2)  # errors 0.5 and 2
    assert jepa_loss(pred, target, "smooth_l1").item() == pytest.approx((0.5 * 0.5**2 + (2 - 0.5)) / 2)  # beta 1
    assert jepa_loss(pred, target, "l2").item() == pytest.approx((0.25 + 4) / 2)
    assert jepa_loss(pred, target, "l1").item() == pytest.approx((0.5 + 2) / 2)
    a, b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # cos 0 and 1
    assert jepa_loss(a, b, "cosine").item() == pytest.approx(1 - (0 + 1) / 2)


def test_unknown_loss_kind_raises():
    with pytest.raises(ValueError, match="unknown loss"):
        jepa_loss(torch.zeros(2), torch.zeros(2), "l3")


def test_vicreg_terms_rise_on_collapsed_and_redundant_batches():
    torch.manual_seed(0)
    healthy = torch.randn(256, 16)
    var_h, cov_h = vicreg_loss(healthy)
    var_c, _ = vicreg_loss(torch.ones(256, 16) + 1e-3 * torch.randn(256, 16))
    _, cov_r = vicreg_loss(torch.randn(256, 1).expand(256, 16).contiguous())
    assert var_c > var_h + 0.5 and cov_r > cov_h + 1.0


def test_vicreg_covariance_term_is_off_diagonal_only_by_hand():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) * torch.tensor([3.0, 0.5])
    variance, covariance = vicreg_loss(z)  # uncorrelated columns of std 2*sqrt(3) and sqrt(1/3)
    assert covariance.item() == pytest.approx(0.0, abs=1e-9)  # unequal variances are not penalised
    assert variance.item() == pytest.approx((1 - math.sqrt(1 / 3 + 1e-4)) / 2, rel=1e-5)  # hinge on column 2 only
    y = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])  # cov [[4/3, 4/3], [4/3, 4/3]]
    assert vicreg_loss(y)[1].item() == pytest.approx(2 * (4 / 3) ** 2 / 2, rel=1e-5)  # two off-diagonal entries / D


def test_pixel_targets_match_loop():
    imgs = torch.randn(2, 3, 8, 12)
    px = losses.pixel_targets(imgs, 4)  # (2, 6, 48): 2 rows of 3 patches, row-major as the encoder's tokens
    for b in range(2):
        for r in range(2):
            for c in range(3):
                patch = imgs[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].flatten()
                torch.testing.assert_close(px[b, r * 3 + c], (patch - patch.mean()) / (patch.var() + 1e-6).sqrt())


def test_sigreg_small_for_gaussian_large_for_collapsed_low_rank_shifted():
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    z = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    gaussian = sigreg(z, generator=gen()).item()
    rank_one = torch.randn(512, 1) @ F.normalize(torch.randn(1, 64), dim=1) * 8  # same total variance as z
    for bad in (torch.zeros(512, 64), rank_one, z + 2, 0.1 * z):
        assert sigreg(bad, generator=gen()).item() > 20 * gaussian
    assert gaussian < 2.0
    z.requires_grad_(True)
    sigreg(z, generator=gen()).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_sigreg_of_standard_normal_samples_matches_the_integral():
    # E[n |ecf(t) - phi(t)|^2] = 1 - exp(-t^2) for N(0, 1) projections, so the statistic's expectation is the
    # integral of (1 - exp(-t^2)) exp(-t^2/2) over [-3, 3] = sqrt(2 pi) erf(3/sqrt 2) - sqrt(2 pi / 3) erf(...)
    expected = (math.sqrt(2 * math.pi) * math.erf(3 / math.sqrt(2))
                - math.sqrt(2 * math.pi / 3) * math.erf(3 * math.sqrt(3) / math.sqrt(2)))  # 1.0527
    g = torch.Generator().manual_seed(0)
    values = [sigreg(torch.randn(512, 64, generator=g), generator=torch.Generator().manual_seed(s)).item()
              for s in range(40)]
    assert sum(values) / 40 == pytest.approx(expected, abs=0.06)  # 40 samples: standard error ~0.013


def test_sigreg_matches_a_naive_loop_over_directions_and_knots():
    z = torch.randn(7, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.3 + 0.2
    directions = torch.randn(3, 5, generator=torch.Generator().manual_seed(9))  # as sigreg draws them
    directions = directions / directions.norm(dim=0)
    step, total = 3.0 / 16, 0.0
    for m in range(5):  # the trapezoid rule on 17 knots of [0, 3], doubled for [-3, 0] by symmetry
        x = (z.float() @ directions[:, m]).double().tolist()
        for k in range(17):
            t = k * step
            ecf = sum(complex(math.cos(t * xi), math.sin(t * xi)) for xi in x) / len(x)
            weight = step / 2 if k in (0, 16) else step
            total += 2 * weight * len(x) * abs(ecf - math.exp(-t * t / 2)) ** 2 * math.exp(-t * t / 2)
    got = sigreg(z.float(), num_slices=5, generator=torch.Generator().manual_seed(9)).item()
    assert got == pytest.approx(total / 5, rel=1e-4)


def _sigreg_rank(rank, path, z):
    dist.init_process_group("gloo", init_method=f"file://{path}/pg", rank=rank, world_size=2)
    mine = z[rank * 32:(rank + 1) * 32].clone().requires_grad_()
    value = sigreg(mine, generator=torch.Generator().manual_seed(5))
    value.backward()
    torch.save((value.detach(), mine.grad), f"{path}/value{rank}.pt")
    dist.destroy_process_group()


def test_sigreg_same_on_one_process_and_two_ddp_processes(tmp_path):
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)) * 1.5 + 0.3
    torch.multiprocessing.spawn(_sigreg_rank, args=(str(tmp_path), z), nprocs=2)
    whole = z.clone().requires_grad_()
    one = sigreg(whole, generator=torch.Generator().manual_seed(5))
    one.backward()
    for rank in range(2):
        value, grad = torch.load(tmp_path / f"value{rank}.pt")
        torch.testing.assert_close(value, one.detach(), rtol=1e-5, atol=1e-5)
        # every rank's loss is the global one, so its rows' gradient is summed over the 2 ranks; DDP's
        # average of the parameter gradients then gives the one-process gradient
        torch.testing.assert_close(grad, 2 * whole.grad[rank * 32:(rank + 1) * 32], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- monitor.py

def test_effective_rank_hand_worked_singular_values():
    z = torch.zeros(6, 4)
    z[0, 0], z[1, 1] = 3.0, 1.0  # singular values 3 and 1: RankMe's p = (0.75, 0.25)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert collapse_stats(z)["eff_rank"] == pytest.approx(expected, rel=1e-4)


def test_effective_rank_separates_full_from_rank_one():
    torch.manual_seed(0)
    full = collapse_stats(torch.randn(512, 32))
    rank_one = collapse_stats(torch.randn(512, 1) @ torch.randn(1, 32))
    assert full["eff_rank"] > 25 and rank_one["eff_rank"] < 1.5
    assert collapse_stats(torch.ones(64, 8))["std_mean"] == 0.0


def test_collapse_alarm_fires_on_one_direction_even_from_a_low_start():
    start = {"std_mean": 0.129, "eff_rank": 2.9}  # a random-init encoder's pooled features on cifar10-mini
    assert not collapse_suspected({"std_mean": 0.23, "eff_rank": 7.9}, start)  # plain I-JEPA at 3,900 steps
    assert collapse_suspected({"std_mean": 0.018, "eff_rank": 1.34}, start)  # --ema 0 0: one direction
    assert collapse_suspected({"std_mean": 0.0005, "eff_rank": 2.5}, start)  # the std alone fell 250x
    assert not collapse_suspected({"std_mean": 0.3, "eff_rank": 1.6}, {"std_mean": 0.3, "eff_rank": 2.0})


def test_collapse_alarm_fires_when_the_std_falls_tenfold_and_not_before():
    start = {"std_mean": 0.2, "eff_rank": 8.0}
    assert collapse_suspected({"std_mean": 0.019, "eff_rank": 8.0}, start)  # a tenth of the start, less a little
    assert not collapse_suspected({"std_mean": 0.021, "eff_rank": 8.0}, start)  # a tenth, plus a little


def test_collapse_alarm_flags_a_rank_two_batch_in_absolute_terms():
    g = torch.Generator().manual_seed(0)
    rank_two = torch.randn(64, 2, generator=g) @ torch.randn(2, 192, generator=g)  # 64 images, 192 features
    stats, start = collapse_stats(rank_two), {"std_mean": 0.129, "eff_rank": 2.9}  # start: random init's rank
    assert stats["eff_rank"] < 2.01 and stats["width"] == 64
    assert collapse_suspected(stats, start)  # 2 of a reachable 64: below the 4% floor
    assert not collapse_suspected({**stats, "width": 16}, start)  # relative rule alone: 2 > max(0.58, 1.5)
    assert not collapse_suspected(collapse_stats(torch.randn(64, 192, generator=g)), start)


def test_token_share_by_hand():
    v = torch.randn(3, 1, 8)
    assert token_share(v.expand(3, 5, 8)) == pytest.approx(1.0)  # every token of an image the same
    assert token_share(torch.cat([v, -v], dim=1)) == pytest.approx(0.0, abs=1e-6)  # tokens that cancel out
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # mean (0.5, 0.5): 2 * 0.5 / 2 = 0.5
    assert token_share(x) == pytest.approx(0.5)


def test_rule_lowers_the_weight_exactly_when_knn_falls_while_the_prediction_loss_is_low():
    rule = Monitor(lower_reg=0.1)
    rule.reference = {"loss_pred": 1.0}  # the step-1 prediction loss: the loss below is its ratio to it
    # (kNN, prediction loss / its step-1 value) -> reg_scale after, worked by hand: best 40 from the first evaluation
    script = [(40.0, 0.9, 1.0),  # the first: a best, nothing to fall from
              (38.5, 0.1, 1.0),  # 1.5 below: inside the noise
              (37.0, 0.5, 1.0),  # 3 below, but the loss is not very low (0.5 >= 0.4)
              (37.0, 0.3, 0.1),  # 3 below and the loss low: lowered
              (36.0, 0.3, 0.01),  # still so: lowered again
              (39.0, 0.3, 0.01),  # recovered to within 2: left alone
              (45.0, 0.01, 0.01)]  # a new best: nothing fell
    for i, (knn, ratio, scale) in enumerate(script):
        said = rule.act(10 * (i + 1), knn, ratio)
        assert rule.reg_scale == pytest.approx(scale) and not rule.early, (i, vars(rule))
        assert len(said) == (i in (3, 4))
    assert (rule.best_step, rule.best_knn) == (70, 45.0)
    rule = Monitor()  # --lower-reg 0: the same falls change nothing
    rule.reference = {"loss_pred": 1.0}
    assert not any(rule.act(1, knn, 0.0) for knn in (40.0, 30.0, 20.0, 10.0)) and rule.reg_scale == 1.0


def test_rule_early_stop_fires_after_patience_evaluations_without_a_gain_beyond_the_margin():
    script = [30.0, 31.0, 31.4, 31.8, 31.0, 33.0, 33.2, 33.4, 20.0]  # gains beyond 0.5 at 30, 31, 33 (not 31.4, 31.8)
    stale = [0, 0, 1, 2, 3, 0, 1, 2, 3]  # counted by hand; patience 3 is first reached at the fifth evaluation
    rule, stops = Monitor(early_stop=3), []
    for i, knn in enumerate(script):
        said = rule.act(i + 1, knn)
        assert rule.stale_evals == stale[i] and len(said) == bool(rule.early)
        stops.append(bool(rule.early))
    assert stops == [s >= 3 for s in stale] and rule.best_knn == 33.4 and rule.best_step == 8
    rule = Monitor()  # --early-stop 0: the same sequence never stops
    assert not any(rule.act(i, k) or rule.early for i, k in enumerate(script))


def test_monitor_alarm_warns_on_collapse_from_the_first_call_as_yardstick():
    g = torch.Generator().manual_seed(0)
    healthy, collapsed = torch.randn(16, 8, 32, generator=g), torch.randn(1, 1, 32, generator=g).expand(16, 8, 32)
    watched = Monitor()
    first = watched.watch(healthy, 1)
    assert watched.reference["std_mean"] == first["std_mean"] and first["warning"] is None  # step 1: the yardstick
    assert watched.watch(healthy + 0.01, 2)["warning"] is None
    assert "collapse suspected at step 3" in watched.watch(collapsed, 3)["warning"] and watched.warned
    watched.agree(torch.device("cpu"), 3)
    assert watched.collapse_stop is None  # watching only: --stop-on-collapse is off
    stopping = Monitor(stop_on_collapse=True)
    for step, feats in ((1, healthy), (2, collapsed)):
        stopping.watch(feats, step)
        stopping.agree(torch.device("cpu"), step)
    assert stopping.collapse_stop == "error: stopped on collapse at step 2 (--stop-on-collapse)"


def test_monitor_state_dict_keeps_the_keys_old_checkpoints_hold_and_restores_the_rule():
    rule = Monitor(lower_reg=0.1, early_stop=4)
    rule.watch(torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(1)), 1, loss_pred=2.0)
    for step, knn in ((10, 40.0), (20, 30.0)):
        rule.act(step, knn, loss_pred=0.1)
    saved = rule.state_dict()
    assert set(saved) == {"monitor_reference", "best_step", "best_knn", "stale_evals", "reg_scale"}
    again = Monitor(lower_reg=0.1, early_stop=4)
    again.load_state_dict(saved)
    assert again.state_dict() == saved and again.reg_scale == pytest.approx(0.1)
    old = Monitor()
    old.load_state_dict({"monitor_reference": None, "step": 5})  # a checkpoint from before the rule: defaults
    assert (old.best_step, old.best_knn, old.stale_evals, old.reg_scale) == (0, -1.0, 0, 1.0)


def test_lidar_counts_the_classes_of_views_that_are_one_class_plus_noise():
    g = torch.Generator().manual_seed(0)
    for classes in (3, 8):  # images of `classes` classes (orthogonal centres), each seen 6 times through noise
        centres = torch.linalg.qr(torch.randn(32, classes, generator=g))[0].T * 5  # (C, 32)
        views = centres.repeat_interleave(40, 0)[:, None] + 0.1 * torch.randn(40 * classes, 6, 32, generator=g)
        assert classes - 1 <= monitor.lidar(views) <= classes - 0.5  # the centred means span C - 1 directions


def test_lidar_floor_is_one_for_identical_vectors_and_rises_with_informative_directions():
    assert monitor.lidar(torch.ones(20, 4, 16)) == pytest.approx(1.0, abs=1e-3)  # nothing tells images apart
    g = torch.Generator().manual_seed(1)
    images = torch.randn(200, 1, 16, generator=g)  # 16 directions tell images apart, views add a little noise
    assert monitor.lidar(images + 0.05 * torch.randn(200, 5, 16, generator=g)) > 12


def test_rankme_hand_worked_singular_values():
    z = torch.diag(torch.tensor([3.0, 1.0]))  # singular values 3 and 1: p = (0.75, 0.25)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert monitor.rankme(z).item() == pytest.approx(expected, rel=1e-5)


def test_alpha_req_recovers_a_power_law_decay():
    g = torch.Generator().manual_seed(2)
    for alpha in (0.5, 1.5):  # feature i has variance i^-alpha: the eigenvalues decay as a power law of that slope
        z = torch.randn(40000, 32, generator=g) * torch.arange(1, 33).pow(-alpha / 2)
        assert monitor.alpha_req(z) == pytest.approx(alpha, abs=0.1)
    assert monitor.alpha_req(torch.randn(40000, 32, generator=g)) == pytest.approx(0.0, abs=0.1)  # white: flat


def test_label_free_stats_read_views_of_fixed_images_with_their_own_generator():
    g = torch.Generator().manual_seed(3)
    images, state = [(torch.randn(3, 16, 16, generator=g), 0) for _ in range(10)], torch.get_rng_state()
    draw = lambda b, gen: sample_masks(b, (4, 4), generator=gen, min_keep=2)[0]  # noqa: E731
    chunks = monitor.label_free_inputs(images, draw, n=8, views=3, batch=4, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the run's generator untouched
    assert [(len(x), len(m)) for x, m in chunks] == [(4, 3), (4, 3)]
    again = monitor.label_free_inputs(images, draw, n=8, views=3, batch=4, seed=5)
    assert all(torch.equal(a, b) for (x, m), (y, k) in zip(chunks, again) for a, b in [(x, y), *zip(m, k)])
    encoder = models.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    stats = monitor.label_free_stats(encoder, chunks, nullcontext())
    whole = torch.cat([encoder(x).mean(1) for x, _ in chunks]).detach()
    assert stats["rankme"] == pytest.approx(monitor.rankme(whole).item(), rel=1e-5)  # RankMe of the whole images
    views = torch.cat([torch.stack([encoder(x, m).mean(1) for m in ms], 1) for x, ms in chunks]).detach()
    assert stats["lidar"] == pytest.approx(monitor.lidar(views), rel=1e-5)  # LiDAR of each image's masked views


def test_monitor_usage_in_its_docstring_runs_alone_as_written(tmp_path):
    block = code_block(monitor.__doc__, "    import torch")
    out = run_alone(tmp_path, ["monitor.py", "losses.py"], block)
    assert "stopping early at step 80 (--early-stop); best.pt holds step 20" in out


# ------------------------------------------------------------------------------------------------------- data.py

def test_demo_data_is_deterministic_and_sized():
    a, b = data.DemoTextures(20, 24, seed=0), data.DemoTextures(20, 24, seed=0)
    assert a[7][0].shape == (3, 24, 24) and a[7][1] == 7
    assert torch.equal(a[7][0], b[7][0]) and not torch.equal(a[7][0], a[17][0])


def test_step_batches_split_global_batch_across_ranks():
    one = list(data.StepBatches(40, 8, 0, 1, seed=1, start=0, total=7))
    two = [list(data.StepBatches(40, 4, r, 2, seed=1, start=0, total=7)) for r in range(2)]
    assert all(one[s] == two[0][s] + two[1][s] for s in range(7))
    assert list(data.StepBatches(40, 8, 0, 1, seed=1, start=3, total=7)) == one[3:]  # resume skips, no replay
    assert one[5][0][1] == 1  # 5 batches per epoch: step 5 is in epoch 1


def test_step_batches_visit_every_image_once_per_epoch_in_a_new_order():
    steps = list(data.StepBatches(40, 8, 0, 1, seed=1, start=0, total=10))  # 5 steps an epoch
    epochs = [[i for batch in steps[e * 5:(e + 1) * 5] for i, _ in batch] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))
    assert epochs[0] != epochs[1]
    assert {e for batch in steps[5:] for _, e in batch} == {1}  # the epoch travels with each index, for its crop


def test_step_batches_order_depends_on_the_seed():
    order = lambda seed: [i for batch in data.StepBatches(40, 8, 0, 1, seed, 0, 10) for i, _ in batch]  # noqa: E731
    assert order(1) == order(1)  # a function of the seed
    assert order(1) != order(2) and order(0) != order(2)  # --seed changes the data order, as it changes the masks
    assert sorted(order(2)[:40]) == list(range(40))  # each still visits every image once an epoch


def test_random_resized_crop_is_a_function_of_seed_epoch_and_index():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    crop = data.RandomResizedCrop(16, seed=0)
    assert torch.equal(crop(img, (0, 3)), data.RandomResizedCrop(16, seed=0)(img, (0, 3)))  # reproducible
    for other in ((1, 3), (0, 4)):  # another epoch or another image: another crop
        assert not torch.equal(crop(img, (0, 3)), crop(img, other))
    assert not torch.equal(crop(img, (0, 3)), data.RandomResizedCrop(16, seed=1)(img, (0, 3)))


def test_center_crop_transform():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    assert data.CenterCrop(16)(img).shape == (3, 16, 16)
    same = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    torch.testing.assert_close(data.CenterCrop(16)(same), data.to_tensor(same))


def test_center_crop_takes_the_centre():
    for w, h in ((48, 16), (16, 48)):  # thirds along the long side: red, green, blue; the crop must be green
        px = np.zeros((h, w, 3), dtype=np.uint8)
        for third in range(3):
            box = (slice(None), slice(third * w // 3, (third + 1) * w // 3)) if w > h else \
                  (slice(third * h // 3, (third + 1) * h // 3), slice(None))
            px[box + (third,)] = 255
        out = data.CenterCrop(16)(Image.fromarray(px)) * data.STD[:, None, None] + data.MEAN[:, None, None]
        torch.testing.assert_close(out.mean((1, 2)), torch.tensor([0.0, 1.0, 0.0]), atol=1e-3, rtol=0)


def test_grayscale_transform_is_luma_in_every_channel():
    rgb = np.random.default_rng(1).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    out = data.CenterCrop(16, grayscale=True)(Image.fromarray(rgb))
    pixels = out * data.STD[:, None, None] + data.MEAN[:, None, None]  # back to [0, 1]
    luma = (rgb.astype(np.float64) @ [0.299, 0.587, 0.114]) / 255.0  # the ITU-R 601-2 weights, by hand
    for channel in pixels:
        np.testing.assert_allclose(channel.numpy(), luma, atol=1 / 255 + 1e-5)


def test_random_view_identity_flip_and_crop():
    imgs = torch.randn(2, 3, 8, 8)
    same = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.9]] * 2)  # full area, aspect 1, centred, no flip
    torch.testing.assert_close(data.random_view(imgs, same, scale=(1.0, 1.0)), imgs, atol=1e-5, rtol=0)
    flipped = same.clone()
    flipped[1, 4] = 0.1  # image 1 flipped
    out = data.random_view(imgs, flipped, scale=(1.0, 1.0))
    torch.testing.assert_close(out[1], imgs[1].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0], imgs[0], atol=1e-5, rtol=0)
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    ramp = (cols + 10 * rows).expand(1, 3, 8, 8)  # bilinear sampling reproduces a linear image exactly
    centre = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.9]])  # a quarter of the area, in the centre
    expected = (cols / 2 + 1.75) + 10 * (rows / 2 + 1.75)  # output pixel j samples input column j/2 + 1.75
    torch.testing.assert_close(data.random_view(ramp, centre, scale=(0.25, 0.25))[0, 0], expected, atol=1e-4, rtol=0)


def test_broken_files_are_skipped_and_all_modes_load(tmp_path, capsys):
    data = make_folder(str(tmp_path / "data"))
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    img.convert("CMYK").save(tmp_path / "data" / "a" / "cmyk.jpg")
    img.convert("P").save(tmp_path / "data" / "a" / "palette.png")
    img.resize((1, 1)).save(tmp_path / "data" / "b" / "tiny.png")
    img.save(tmp_path / "data" / "b" / "full.jpg")
    raw = open(tmp_path / "data" / "b" / "full.jpg", "rb").read()
    open(tmp_path / "data" / "b" / "truncated.jpg", "wb").write(raw[: len(raw) // 3])
    open(tmp_path / "data" / "b" / "empty.jpg", "wb").close()
    open(tmp_path / "data" / "b" / "notes.txt", "w").write("not an image")
    train.main(["--data", data, "--steps", "6", "--batch-size", "8", "--out", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err
    for name in ("truncated.jpg", "empty.jpg", "notes.txt"):
        assert sum(name in line and "skipping" in line for line in err.splitlines()) == 1
    for name in ("cmyk.jpg", "palette.png", "tiny.png"):
        assert name not in err


def test_preloaded_images_give_the_same_items_as_decoding_each_time(tmp_path):
    root = make_folder(str(tmp_path / "data"))
    open(os.path.join(root, "a", "broken.jpg"), "wb").write(b"not a jpeg")  # skipped alike on both paths
    lazy, memory = (data.ImageFolder(root, data.RandomResizedCrop(16, seed=3)) for _ in range(2))
    assert memory.preload() and memory.images is not None and lazy.images is None
    for item in [(i, e) for i in range(len(lazy)) for e in (0, 1)]:
        (x, y), (x2, y2) = lazy[item], memory[item]
        assert torch.equal(x, x2) and y == y2
    bank = memory.with_transform(data.CenterCrop(16))
    assert bank.images is memory.images and torch.equal(bank[2][0], data.CenterCrop(16)(lazy.load(2)[0]))
    assert not data.ImageFolder(root, data.CenterCrop(16)).preload(limit_bytes=1000)  # too large: decoded each time


def test_nothing_readable_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "data" / "a")
    open(tmp_path / "data" / "a" / "x.jpg", "wb").write(b"garbage")
    r = run_train("--data", str(tmp_path / "data"), "--steps", "1", "--out", str(tmp_path / "o"), *TINY)
    assert r.returncode != 0 and "no readable image" in r.stderr


def test_empty_data_folder_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "empty" / "a")
    r = run_train("--data", str(tmp_path / "empty"), "--steps", "1", "--out", str(tmp_path / "o"), *TINY)
    assert r.returncode != 0 and "no images found" in r.stderr and str(tmp_path / "empty") in r.stderr


# ------------------------------------------------------------------------------------------------- checkpoint.py

def test_checkpoint_module_serves_another_loop_with_its_three_calls(tmp_path):
    def run(out, steps, resume=False):  # a loop that is not I-JEPA's: the three calls of checkpoint.py's docstring
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 2)
        opt = torch.optim.AdamW(net.parameters(), lr=0.1)
        latest = checkpoint.claim_run(str(out), SimpleNamespace(resume=resume, auto_resume=False))
        start = checkpoint.restore(latest, {"net": net}, opt)["step"] if resume else 0
        for step in range(start, steps):
            g = torch.Generator().manual_seed(step)  # the data of a step: a function of the step
            loss = net(torch.randn(8, 4, generator=g)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            checkpoint.save_run(str(out), checkpoint.checkpoint_state({"net": net}, opt, None, step + 1))
        return net.state_dict()

    whole = run(tmp_path / "whole", 6)
    run(tmp_path / "split", 3)
    with pytest.raises(SystemExit, match="already holds a run at step 3"):
        run(tmp_path / "split", 6)
    again = run(tmp_path / "split", 6, resume=True)
    assert all(torch.equal(whole[k], again[k]) for k in whole)


def test_trim_log_keeps_rows_up_to_the_checkpoint(tmp_path):
    path = str(tmp_path / "log.csv")
    rows = [["# torch=2 threads=1"], ["step", "loss"]] + [[str(s), str(s / 10)] for s in (1, 2)] + [
        ["# resumed at step 2: torch=2 threads=2"]] + [[str(s), str(s / 10)] for s in (5, 6, 7)] + [
        ["# resumed at step 7: torch=2 threads=4"], ["10", "1.0"]]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    open(path, "a").write("11,0.")  # a row cut short by a kill mid-write
    assert checkpoint.trim_log(path, 6)
    assert list(csv.reader(open(path))) == rows[:7]  # up to step 6: 7, its resume, 10 and the torn 11 are gone
    assert not checkpoint.trim_log(str(tmp_path / "none.csv"), 6)  # no log yet: nothing to trim


def test_checkpoint_holds_everything_and_loads_weights_only(tmp_path):
    data = make_folder(str(tmp_path / "data"))
    train.main(["--data", data, "--steps", "2", "--batch-size", "4", "--out", str(tmp_path), *TINY])
    ckpt = load(tmp_path / "latest.pt")  # weights_only=True
    assert {"encoder", "predictor", "target_encoder", "optimizer", "scaler", "step", "epoch", "config", "args",
            "monitor_reference"} <= set(ckpt)
    assert not (tmp_path / "latest.pt.tmp").exists()


class Malicious:
    def __reduce__(self):
        return (open, ("/tmp/pwned-by-checkpoint", "w"))


def test_pickled_object_in_checkpoint_is_refused_without_running(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"encoder": {}, "payload": Malicious()}, path)
    if os.path.exists("/tmp/pwned-by-checkpoint"):
        os.remove("/tmp/pwned-by-checkpoint")
    with pytest.raises(SystemExit, match="refusing to load"):
        checkpoint.load_checkpoint(str(path))
    assert not os.path.exists("/tmp/pwned-by-checkpoint")


def test_resume_errors(tmp_path):
    data = make_folder(str(tmp_path / "data"))
    r = run_train("--data", data, "--steps", "1", "--batch-size", "4", "--out", str(tmp_path / "none"), "--resume",
                  *TINY)
    assert r.returncode != 0 and "no checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    train.main(["--data", data, "--steps", "1", "--batch-size", "4", "--out", str(tmp_path / "o"), *TINY])
    with pytest.raises(SystemExit, match="another architecture"):
        train.main(["--data", data, "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "o"), "--resume",
                    *TINY, "--pred-dim", "24"])


def test_best_checkpoint_is_never_written_with_non_finite_weights(tmp_path):
    # train.py writes best.pt and latest.pt through checkpoint.py's one guard; a non-finite weight stops the write
    good = {part: {"w": torch.ones(2)} for part in ("encoder", "predictor", "target_encoder")}
    checkpoint.save_checkpoint(str(tmp_path / "best.pt"), {**good, "step": 1})
    before = open(tmp_path / "best.pt", "rb").read()
    bad = {**good, "encoder": {"w": torch.tensor([1.0, float("inf")])}, "step": 2}
    with pytest.raises(SystemExit, match="non-finite encoder weights at step 2"):
        checkpoint.save_checkpoint(str(tmp_path / "best.pt"), bad)
    assert open(tmp_path / "best.pt", "rb").read() == before and not (tmp_path / "best.pt.tmp").exists()


def test_same_command_twice_refuses_and_leaves_the_run_untouched(tmp_path):
    data = make_folder(str(tmp_path / "data"))
    args = ["--data", data, "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "o"), *TINY]
    train.main(args)
    before = {f: open(tmp_path / "o" / f, "rb").read() for f in ("latest.pt", "log.csv")}
    r = run_train(*args)
    assert r.returncode != 0 and "step 2" in r.stderr and "--resume" in r.stderr and "--out" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert before == {f: open(tmp_path / "o" / f, "rb").read() for f in ("latest.pt", "log.csv")}


def test_auto_resume_starts_then_continues(tmp_path):
    data = make_folder(str(tmp_path / "data"))
    args = ["--data", data, "--batch-size", "4", "--out", str(tmp_path / "o"), "--auto-resume", *TINY]
    assert train.main([*args, "--steps", "2"])["steps"] == 2  # nothing to resume: it starts
    assert train.main([*args, "--steps", "3"])["steps"] == 1  # the same line again: it continues from step 2
    assert load(tmp_path / "o" / "latest.pt")["step"] == 3


def _stop_rank(rank, path):
    dist.init_process_group("gloo", init_method=f"file://{path}/pg", rank=rank, world_size=2)
    asked = {"signal": signal.SIGUSR1} if rank == 1 else {}  # only rank 1 was signalled
    torch.save(checkpoint.stop_requested(asked, torch.device("cpu")), f"{path}/stop{rank}.pt")
    dist.destroy_process_group()


def test_stop_signal_on_one_rank_stops_every_rank(tmp_path):
    torch.multiprocessing.spawn(_stop_rank, args=(str(tmp_path),), nprocs=2)
    assert [torch.load(tmp_path / f"stop{r}.pt") for r in range(2)] == [True, True]
    assert not checkpoint.stop_requested({}, torch.device("cpu"))  # one process, no signal: go on


# ----------------------------------------------------------------------------------------------------- config.py

def test_small_preset_fills_only_unset_flags():
    args = config.get_args(["--data", "somewhere", "--preset", "small", "--invariance", "2"])
    got = (args.model, args.depth, args.epochs, args.steps, args.loss, args.target_layers, args.view_size, args.rgb_aux)
    assert got == ("vit_tiny", 4, 25, None, "l2", 4, 16, 1.0)
    assert args.invariance == 2  # an explicit flag beats the preset
    plain = config.get_args(["--data", "somewhere"])  # the official recipe keeps every departure off
    assert (plain.invariance, plain.target_layers, plain.loss, plain.vicreg, plain.rgb_aux) == (0, 1, "smooth_l1", 0, 0)


@pytest.mark.parametrize("flags, message", [
    (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--img-size", "30", "--patch-size", "8"], "not divisible"),
    (["--target-scale", "0.5", "1.5"], "target_scale"),
    (["--min-keep", "100"], "min_keep"),
    (["--model", "vit_enormous"], "unknown --model"),
    (["--target-layers", "13"], "--target-layers 13"),
    (["--view-size", "12"], "--view-size 12"),
])
def test_bad_input_is_one_clear_line(tmp_path, flags, message):
    args = [*TINY, "--data", "demo", "--steps", "1", "--out", str(tmp_path), *flags]
    r = run_train(*args)
    assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------------------------------------------- machine.py

def test_autocast_dtype_falls_back_to_float32_aloud_on_cpus_without_bf16(monkeypatch):
    said = []
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(machine, "matmul_speed", lambda *a, **k: pytest.fail("emulated bf16 is not timed"))
    assert machine.autocast_dtype(torch.device("cpu"), None, said.append) == torch.float32
    assert len(said) == 1 and "--dtype bfloat16" in said[0]  # not silent: it names the flag that forces bf16


def test_cpu_precision_is_the_faster_by_the_margin_given_two_timings():
    f32, bf16 = torch.float32, torch.bfloat16
    assert machine.cpu_choice({f32: 100.0, bf16: 200.0}) == bf16  # AVX-512 BF16 on an AMD EPYC: ~2x
    assert machine.cpu_choice({f32: 144.0, bf16: 105.0}) == f32  # the Intel Xeon of the issue: 0.73x
    assert machine.cpu_choice({f32: 100.0, bf16: 109.0}) == f32  # faster, but by less than the margin
    assert machine.cpu_choice({f32: 100.0, bf16: 111.0}) == bf16


@pytest.mark.parametrize("speeds, chosen", [((150.0, 100.0), "float32"), ((100.0, 300.0), "bfloat16")])
def test_cpu_precision_is_measured_and_said_on_one_line_with_both_figures(monkeypatch, speeds, chosen):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    timings = dict(zip((torch.float32, torch.bfloat16), speeds))
    monkeypatch.setattr(machine, "matmul_speed", lambda dtype, width: timings[dtype])
    said = []
    assert machine.autocast_dtype(torch.device("cpu"), None, said.append, width=192) == getattr(torch, chosen)
    assert len(said) == 1 and said[0].startswith(f"precision: {chosen}, measured here")
    assert f"{speeds[1]:.0f} GFLOP/s in bfloat16, {speeds[0]:.0f} in float32" in said[0]
    assert machine.autocast_dtype(torch.device("cpu"), "float16", said.append) == torch.float16  # --dtype wins
    assert machine.autocast_dtype(torch.device("cpu"), None, said.append, recorded="bfloat16") == torch.bfloat16
    assert len(said) == 1  # neither measures


def test_matmul_speed_is_positive_and_leaves_the_global_generator_alone():
    state = torch.get_rng_state()
    assert machine.matmul_speed(torch.float32, 16, tokens=64, seconds=0.01) > 0
    assert torch.equal(torch.get_rng_state(), state)  # a measured run draws the same random numbers as any


def test_resumed_run_keeps_its_recorded_precision_whatever_this_machine_measures(tmp_path, monkeypatch, capsys):
    tiny = TINY[:TINY.index("--dtype")] + TINY[TINY.index("--dtype") + 2:]
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    common = ["--data", make_folder(str(tmp_path / "data")), "--steps", "4", "--batch-size", "4", *tiny,
              "--out", str(tmp_path / "o")]
    monkeypatch.setattr(machine, "matmul_speed", lambda dtype, width: 100.0 if dtype == torch.float32 else 50.0)
    stop_after(monkeypatch, 2)
    with pytest.raises(SystemExit):
        train.main(common)
    assert load(tmp_path / "o" / "latest.pt")["args"]["dtype"] == "float32" and "precision: float32" in (
        capsys.readouterr().out)
    monkeypatch.setattr(machine, "matmul_speed", lambda dtype, width: 50.0 if dtype == torch.float32 else 100.0)
    monkeypatch.setattr(checkpoint, "stop_requested", lambda signals, device: False)
    summary = train.main([*common, "--resume"])  # this machine would pick bfloat16 now; the run keeps float32
    assert summary["dtype"] == "float32" and "precision:" not in capsys.readouterr().out


def test_bf16_autocast_engages_on_the_step(tmp_path, monkeypatch):
    tiny = TINY[:TINY.index("--dtype")] + TINY[TINY.index("--dtype") + 2:]
    dtype = [] if torch.cuda.is_available() else ["--dtype", "bfloat16"]  # a GPU's default; a CPU's when asked
    seen, build = set(), train.build

    def build_and_watch(args, device, log=print):  # every linear layer of the three networks reports its output dtype
        nets, optimizer, config = build(args, device, log)
        for net in (nets.encoder, nets.predictor, nets.target):
            for m in net.modules():
                if isinstance(m, torch.nn.Linear):
                    m.register_forward_hook(lambda mod, inputs, out: seen.add(out.dtype))
        return nets, optimizer, config

    monkeypatch.setattr(train, "build", build_and_watch)
    summary = train.main(["--data", make_folder(str(tmp_path / "data")), "--steps", "2", "--batch-size", "4", *tiny,
                          *dtype, "--out", str(tmp_path / "o")])
    assert seen == {torch.bfloat16} and math.isfinite(summary["loss"])  # not silently float32


def test_deterministic_runs_repeat_bit_for_bit(tmp_path):
    args = ["--data", make_folder(str(tmp_path / "data")), "--steps", "3", "--batch-size", "4", *TINY, *EXACT]
    for run in ("a", "b"):
        train.main([*args, "--out", str(tmp_path / run)])
    assert torch.are_deterministic_algorithms_enabled()  # the flag reached PyTorch
    a, b = load(tmp_path / "a" / "latest.pt"), load(tmp_path / "b" / "latest.pt")
    assert all(torch.equal(a[p][k], b[p][k]) for p in ("encoder", "predictor", "target_encoder") for k in a[p])


@CUDA
def test_gpu_peak_memory_line_reports_the_allocator(tmp_path, capsys):
    torch.cuda.reset_peak_memory_stats()
    summary = train.main(["--data", make_folder(str(tmp_path / "data")), "--steps", "2", "--batch-size", "4", *TINY,
                          "--device", "cuda", "--out", str(tmp_path / "o")])
    peak = torch.cuda.max_memory_allocated() / 2**20
    assert summary["peak_mem_mb"] == pytest.approx(peak) and peak > 0
    lines = [int(m) for m in re.findall(r"mem (\d+)MB", capsys.readouterr().out)]
    assert lines and all(0 < m <= round(peak) for m in lines)


# ------------------------------------------------------------------------------------------------------ train.py

def test_train_runs_on_image_folder(tmp_path):
    data = make_folder(str(tmp_path / "data"))
    summary = train.main(["--data", data, "--steps", "3", "--batch-size", "4", "--out", str(tmp_path / "o"), *TINY])
    assert summary["steps"] == 3 and math.isfinite(summary["loss"])
    ckpt = load(tmp_path / "o" / "latest.pt")
    assert ckpt["step"] == 3 and set(ckpt["encoder"]) == set(ckpt["target_encoder"])
    assert len(log_rows(tmp_path / "o" / "log.csv")) == 4  # header + 3 rows


def test_train_runs_on_demo_data_with_knn(tmp_path, capsys):
    summary = train.main(["--data", "demo", "--steps", "2", "--batch-size", "8", "--out", str(tmp_path), *TINY])
    assert 0 <= summary["knn_top1"] <= 100 and 0 <= summary["knn_top1_random"] <= 100
    assert "summary: steps=2" in capsys.readouterr().out


def test_no_gradient_reaches_target(tmp_path):
    # with momentum fixed at 1 the target may only change through gradients, and it must not
    data = make_folder(str(tmp_path / "data"))
    train.main(["--data", data, "--steps", "2", "--batch-size", "4", "--ema", "1", "1", "--out", str(tmp_path / "o"),
                *TINY])
    ckpt = load(tmp_path / "o" / "latest.pt")
    torch.manual_seed(0)
    init = models.VisionTransformer(**ckpt["config"]["encoder"]).state_dict()
    assert all(torch.equal(init[k], v) for k, v in ckpt["target_encoder"].items())
    assert not all(torch.equal(init[k], v) for k, v in ckpt["encoder"].items())


def test_weight_decay_spares_biases_and_norms_in_adamw():
    enc = tiny_encoder(depth=1)
    opt = train.make_optimizer(list(enc.parameters()), lr=0.1, wd=0.5)
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    for p in enc.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decoupled weight decay moves a parameter
    opt.step()
    for n, p in enc.named_parameters():
        factor = 1 - 0.1 * 0.5 if p.ndim > 1 else 1.0  # AdamW: p -= lr * wd * p, on matrices only
        torch.testing.assert_close(p.detach(), before[n] * factor, msg=n)
    assert opt.param_groups[0]["weight_decay"] == 0.5  # the group train.py's wd schedule writes to


def test_schedules_at_known_steps():
    args = SimpleNamespace(lr=1e-3, start_lr=2e-4, final_lr=1e-6, wd=0.04, final_wd=0.4)
    assert train.lr_at(0, 100, 10, args) == pytest.approx(2e-4)
    assert train.lr_at(5, 100, 10, args) == pytest.approx(6e-4)
    assert train.lr_at(10, 100, 10, args) == pytest.approx(1e-3)
    assert train.lr_at(55, 100, 10, args) == pytest.approx((1e-3 + 1e-6) / 2)
    assert train.lr_at(100, 100, 10, args) == pytest.approx(1e-6)
    assert train.wd_at(0, 100, args) == pytest.approx(0.04) and train.wd_at(100, 100, args) == pytest.approx(0.4)
    assert train.wd_at(50, 100, args) == pytest.approx(0.22)


def test_target_layers_average_matches_loop():
    enc = tiny_encoder(depth=3)
    x = torch.randn(2, 3, 32, 32)
    feats, h = train.target_features(enc, x, 1, "layernorm")
    torch.testing.assert_close(h, F.layer_norm(enc(x), (48,)))
    z = enc.patch_embed(x) + enc.pos_embed
    outs = []
    for blk in enc.blocks:
        z = blk(z)
        outs.append(F.layer_norm(z, (48,)))
    feats2, h2 = train.target_features(enc, x, 2, "layernorm")
    torch.testing.assert_close(feats2, enc(x))
    torch.testing.assert_close(h2, (outs[1] + outs[2]) / 2)
    assert not enc.blocks[-1]._forward_hooks  # the hooks are gone


def test_target_norm_layer_normalises_the_target_features():
    enc = tiny_encoder()
    with torch.no_grad():  # the encoder's own final LayerNorm at another scale and shift than unit
        enc.norm.weight.fill_(3.0)
        enc.norm.bias.fill_(1.0)
    x = torch.randn(2, 3, 32, 32)
    feats, h = train.target_features(enc, x, 1, "layernorm")
    assert feats.mean().item() == pytest.approx(1.0, abs=1e-4)  # the encoder output: mean 1, std 3
    torch.testing.assert_close(h.mean(-1), torch.zeros(2, 64), atol=1e-5, rtol=0)  # the targets: per token
    torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(2, 64), atol=1e-3, rtol=0)
    torch.testing.assert_close(train.target_features(enc, x, 1, "none")[1], feats)  # --target-norm none


def test_shared_target_collapses_and_default_does_not(tmp_path):
    # one encoder on both branches with gradients through both (no stop-gradient, no EMA) lets the
    # two branches agree on a constant; the default EMA target with stop-gradient does not
    common = ["--data", "demo", "--steps", "40", "--batch-size", "16", "--vicreg", "0", *TINY, "--log-every", "10"]
    shared = train.main([*common, "--target", "shared", "--out", str(tmp_path / "shared")])
    default = train.main([*common, "--out", str(tmp_path / "default")])
    assert shared["std_mean"] < 0.2 * default["std_mean"] and shared["collapse_warnings"] > 0
    assert default["collapse_warnings"] == 0


COLLAPSING = """import os, sys
sys.path.insert(0, sys.argv.pop(1))
import train
step, collapsing_rank = train.train_step, sys.argv.pop(1)

def collapsing(*a, **kw):  # one rank's target features fall onto one vector: every token of every image alike
    loss, feats, terms, bad = step(*a, **kw)
    return loss, (feats[:1, :1].expand_as(feats) if os.environ["RANK"] == collapsing_rank else feats), terms, bad

train.train_step = collapsing
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("rank", ["0", "1"])
def test_stop_on_collapse_under_torchrun_stops_every_rank_with_the_message(tmp_path, rank):
    (tmp_path / "collapsing.py").write_text(COLLAPSING)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "collapsing.py"), HERE, rank, "--data",
                        make_folder(str(tmp_path / "data"), n_per_class=10), "--steps", "20", "--batch-size", "8",
                        "--device", "cpu", *TINY, "--save-every", "1",
                        "--stop-on-collapse", "--out", str(tmp_path / "o")], cwd=HERE, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # a rank left waiting: a timeout
    said = f"error: stopped on collapse at step 2 on rank {rank} of 2 (--stop-on-collapse)"
    assert r.returncode != 0 and (r.stdout + r.stderr).count(said) == 2, r.stdout + r.stderr  # from each rank
    assert load(tmp_path / "o" / "latest.pt")["step"] == 1  # the collapsed step is not saved over the last good one


def test_stop_on_collapse_ends_one_process_in_one_line_and_keeps_the_last_save(tmp_path):
    r = run_train("--data", "demo", "--steps", "40", "--batch-size", "16", "--vicreg", "0", *TINY, "--log-every",
                  "10", "--target", "shared", "--stop-on-collapse", "--out", str(tmp_path / "o"))
    said = r"error: stopped on collapse at step \d+ \(--stop-on-collapse\); not saved: \S+latest.pt holds the last save"
    assert r.returncode == 1 and re.fullmatch(said + ", if any", r.stderr.strip()), r.stderr
    assert "warning: representation collapse suspected" in r.stdout and not (tmp_path / "o" / "latest.pt").exists()


def test_sigreg_directions_are_drawn_anew_at_every_step(tmp_path, monkeypatch):
    step_fn, seeds = train.train_step, []

    def step_and_note(*a, sigreg_generator=None, **kw):  # the generator the loop hands SIGReg at each step
        seeds.append(sigreg_generator.initial_seed())
        return step_fn(*a, sigreg_generator=sigreg_generator, **kw)

    monkeypatch.setattr(train, "train_step", step_and_note)
    train.main(["--data", make_folder(str(tmp_path / "data")), "--steps", "3", "--batch-size", "4", *TINY,
                "--sigreg", "0.5", "--seed", "2", "--out", str(tmp_path / "o")])
    assert seeds == [2 * 1_000_003 + step + 7 for step in range(3)]  # a function of (seed, step): every rank's
    nets = train.build(config.get_args(["--data", "demo", "--batch-size", "8", *TINY]), torch.device("cpu"))[0]
    imgs, gen = torch.randn(8, 3, 32, 32), torch.Generator().manual_seed(0)
    masks_ctx, masks_tgt = sample_masks(8, (4, 4), generator=gen, min_keep=4)
    with torch.no_grad():  # the term is SIGReg of the pooled context along the generator's directions
        pooled = nets.encoder(imgs, masks_ctx).mean(dim=1)
        terms = [train.ijepa_loss(nets.encoder, nets.predictor, nets.target, imgs, masks_ctx, masks_tgt,
                                  sigreg_weight=0.5, sigreg_generator=torch.Generator().manual_seed(s))[2]["sigreg"]
                 for s in seeds[:2]]
    for seed, term in zip(seeds, terms):
        torch.testing.assert_close(term, losses.sigreg(pooled, generator=torch.Generator().manual_seed(seed)))
    assert not torch.equal(terms[0], terms[1])  # the same directions every step would test only those


def test_sigreg_projector_runs_logs_each_term_and_resumes(tmp_path):
    data = make_folder(str(tmp_path / "data"))
    common = ["--data", data, "--batch-size", "4", "--sigreg", "0.05", "--projector", "8", *TINY]
    for target in ("ema", "shared"):  # LeJEPA's arrangement with the guards; LeWorldModel's without them
        out = str(tmp_path / target)
        train.main([*common, "--steps", "2", "--target", target, "--out", out])
        rows = csv_rows(os.path.join(out, "log.csv"))
        assert all(float(r["loss_sigreg"]) > 0 and float(r["loss_pred"]) > 0 and r["loss_vicreg"] == "" for r in rows)
        ckpt = load(os.path.join(out, "latest.pt"))
        assert ckpt["projector"]["6.weight"].shape == (8, 2048)  # Linear-BN-ReLU x2 (2048 wide), Linear to 8
        assert train.main([*common, "--steps", "3", "--target", target, "--out", out, "--resume"])["steps"] == 1
    with pytest.raises(SystemExit, match="--projector 8 needs --sigreg"):
        train.main(["--data", data, *TINY, "--steps", "1", "--projector", "8", "--out", str(tmp_path / "x")])


def test_rgb_aux_and_frozen_target_run(tmp_path):
    summary = train.main(["--data", "demo", "--steps", "2", "--batch-size", "8", "--rgb-aux", "0.1",
                          "--target", "frozen", *TINY, "--out", str(tmp_path)])
    ckpt = load(tmp_path / "latest.pt")
    assert "rgb_head" in ckpt and math.isfinite(summary["loss"])
    torch.manual_seed(0)
    init = models.VisionTransformer(**ckpt["config"]["encoder"]).state_dict()
    assert all(torch.equal(init[k], v) for k, v in ckpt["target_encoder"].items())


def test_invariance_and_target_layers_run(tmp_path):
    common = ["--data", "demo", "--steps", "2", "--batch-size", "8", *TINY]
    plain = train.main([*common, "--out", str(tmp_path / "plain")])
    both = train.main([*common, "--invariance", "1", "--view-size", "16", "--target-layers", "2",
                       "--out", str(tmp_path / "both")])
    assert math.isfinite(both["loss"]) and both["loss"] != plain["loss"]


def test_salt_stage_one_has_no_latent_loss_and_stage_two_keeps_its_teacher(tmp_path):
    common = ["--data", make_folder(str(tmp_path / "data")), "--steps", "2", "--batch-size", "4", *TINY]
    stage1 = [*common, "--latent-weight", "0", "--rgb-aux", "1"]
    a = train.main([*stage1, "--out", str(tmp_path / "s1")])
    b = train.main([*stage1, "--loss", "cosine", "--target-norm", "none", "--out", str(tmp_path / "s1b")])
    assert a["loss"] == b["loss"]  # the latent targets and their loss take no part
    teacher = load(tmp_path / "s1" / "latest.pt")["target_encoder"]
    train.main([*common, "--target", "frozen", "--teacher", str(tmp_path / "s1" / "latest.pt"),
                "--out", str(tmp_path / "s2")])
    after = load(tmp_path / "s2" / "latest.pt")["target_encoder"]
    assert all(torch.equal(teacher[k], v) for k, v in after.items())


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = make_folder(str(tmp_path / "data"))
    r = run_train("--data", data, "--steps", "10", "--batch-size", "4", "--save-every", "1", "--warmup", "0",
                  "--lr", "1e30", "--start-lr", "1e30", "--out", str(tmp_path / "o"), *TINY)
    assert r.returncode != 0 and "non-finite loss in steps" in r.stderr, r.stderr
    ckpt = load(tmp_path / "o" / "latest.pt")
    assert all(torch.isfinite(v).all() for part in ("encoder", "predictor", "target_encoder")
               for v in ckpt[part].values() if v.is_floating_point())


def test_non_finite_step_never_reaches_the_weights(tmp_path, monkeypatch):
    loss_fn, step_fn, unchanged, steps = train.ijepa_loss, train.train_step, [], iter(range(100))

    def nan_at_step_2(*a, **kw):
        loss, feats, terms = loss_fn(*a, **kw)
        return (loss * math.nan if next(steps) == 2 else loss), feats, terms

    def step_and_compare(nets, optimizer, *rest, **kw):  # the trained weights and AdamW's state, before and after
        trained = lambda: [t.clone() for t in [*nets.online.parameters(), *nets.raw_predictor.parameters(),  # noqa
                                               *(v for s in optimizer.state.values() for v in s.values())]]
        before, out = trained(), step_fn(nets, optimizer, *rest, **kw)
        unchanged.append(all(torch.equal(a, b) for a, b in zip(before, trained())))
        return out

    monkeypatch.setattr(train, "ijepa_loss", nan_at_step_2)
    monkeypatch.setattr(train, "train_step", step_and_compare)
    with pytest.raises(SystemExit, match="non-finite loss in steps 2-4"):  # found at the next log line, not saved
        train.main(["--data", make_folder(str(tmp_path / "data")), "--steps", "8", "--batch-size", "4", *TINY,
                    "--log-every", "4", "--out", str(tmp_path / "o")])
    assert unchanged == [False, False, True, False]


@pytest.mark.parametrize("make", [lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
                                  lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1),
                                  lambda p: torch.optim.AdamW(p, lr=0.1, fused=True)], ids=["adamw", "sgd", "fused"])
def test_train_step_skips_a_non_finite_step_with_any_optimizer(make):
    args = config.get_args(["--data", "demo", "--batch-size", "4", *TINY])
    torch.manual_seed(0)
    nets = train.build(args, torch.device("cpu"))[0]
    optimizer = make([p for m in (nets.encoder, nets.predictor) for p in m.parameters()])
    imgs, scaler = torch.randn(4, 3, 32, 32), torch.amp.GradScaler("cpu", enabled=False)
    masks = sample_masks(4, (4, 4), generator=torch.Generator().manual_seed(0), min_keep=4)

    def state():  # the weights and every tensor of the optimizer's state, by name
        return {**{f"w{i}": p.clone() for i, p in enumerate(optimizer.param_groups[0]["params"])},
                **{f"s{i}{k}": v.clone() for i, p in enumerate(optimizer.param_groups[0]["params"])
                   for k, v in optimizer.state[p].items() if torch.is_tensor(v)}}

    def step(poison):
        bad = train.train_step(nets, optimizer, scaler, nullcontext(), imgs * poison, *masks, 0.99)[3]
        return bad.item()

    for i, poison in enumerate([math.nan, 1.0, math.inf, 1.0]):  # the first step skipped: the state is born zero
        before = state()
        assert step(poison) == (poison != 1.0)
        after = state()
        same = [k for k in after if k in before and torch.equal(before[k], after[k])]
        if poison == 1.0:
            assert len(same) < len(before) / 2  # a real step moved weights and state
        else:  # nothing moved, and what a skipped first step created is as new: zeros
            assert same == list(before) and all(not after[k].any() for k in after if k not in before), i
    assert all(torch.isfinite(p).all() for p in nets.encoder.parameters())


def test_best_checkpoint_holds_the_best_knn_and_survives_resume(tmp_path, monkeypatch):
    scripted = iter([30.0, 50.0, 40.0, 60.0, 20.0, 10.0, 55.0, 70.0])  # kNN at steps 1-6, 7-8 (the end's: real)
    monkeypatch.setattr(train, "knn_evaluate", lambda *a, **k: (next(scripted), 0.0))
    common = ["--data", knn_folder(str(tmp_path / "data")), "--batch-size", "4", "--knn-every", "1",
              "--out", str(tmp_path / "o"), *TINY]
    summary = train.main([*common, "--steps", "6"])
    assert (summary["best_step"], summary["best_knn"]) == (4, 60.0) and load(tmp_path / "o" / "best.pt")["step"] == 4
    assert [float(r["knn_top1"]) for r in csv_rows(tmp_path / "o" / "log.csv")] == [30, 50, 40, 60, 20, 10]
    again = train.main([*common, "--steps", "8", "--resume"])  # the record carries over: 55 at step 7 is no best
    assert (again["best_step"], again["best_knn"]) == (8, 70.0) and load(tmp_path / "o" / "best.pt")["step"] == 8


RULE_RUN = ["--batch-size", "4", "--knn-every", "2", "--steps", "10", "--vicreg", "1", "--log-every", "1"]


def test_rule_lowered_weight_reaches_the_loss_and_is_logged(tmp_path, monkeypatch):
    scripted = iter([40.0, 30.0, 30.0, 45.0, 44.0])  # steps 2-10
    monkeypatch.setattr(train, "knn_evaluate", lambda *a, **k: (next(scripted), 0.0))
    train.main(["--data", knn_folder(str(tmp_path / "data")), *RULE_RUN, "--lower-reg", "0.1", "--lower-reg-loss",
                "100", "--out", str(tmp_path / "o"), *TINY, "--log-every", "1"])
    rows = csv_rows(tmp_path / "o" / "log.csv")
    # fired at steps 4 and 6 (10 points under 40): in force from steps 5 and 7
    assert [float(r["weight_vicreg"]) for r in rows] == pytest.approx([1] * 4 + [0.1] * 2 + [0.01] * 4)
    for r in rows:  # the logged total is the prediction term plus the weight in force times the VICReg term
        assert float(r["loss"]) == pytest.approx(float(r["loss_pred"]) + float(r["weight_vicreg"]) *
                                                 float(r["loss_vicreg"]), rel=1e-5)


def test_rule_early_stop_ends_the_run_saves_and_keeps_the_peak_in_best(tmp_path, monkeypatch, capsys):
    scripted = iter([50.0, 40.0, 49.0])  # no gain at steps 4 and 6: patience 2 stops at step 6
    monkeypatch.setattr(train, "knn_evaluate", lambda *a, **k: (next(scripted), 0.0))
    summary = train.main(["--data", knn_folder(str(tmp_path / "data")), *RULE_RUN, "--early-stop", "2",
                          "--out", str(tmp_path / "o"), *TINY])
    assert (summary["stopped_early_at"], summary["steps_saved"], summary["steps"]) == (6, 4, 6)
    assert load(tmp_path / "o" / "latest.pt")["step"] == 6 and load(tmp_path / "o" / "best.pt")["step"] == 2
    assert "stopping early at step 6" in capsys.readouterr().out


def test_rule_resumed_mid_way_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    knn = [40.0, 30.0, 30.0, 45.0, 44.0]  # the rule fires at steps 4 and 6, on both sides of the stop
    data = knn_folder(str(tmp_path / "data"))
    args = [*RULE_RUN, "--data", data, "--lower-reg", "0.1", "--lower-reg-loss", "100", *TINY, *EXACT]
    script = iter(knn)
    monkeypatch.setattr(train, "knn_evaluate", lambda *a, **k: (next(script), 0.0))
    train.main([*args, "--out", str(tmp_path / "full")])
    script = iter(knn[:2])  # the interrupted run: a stop signal after step 5, between the two firings
    stop_after(monkeypatch, 5)
    with pytest.raises(SystemExit):
        train.main([*args, "--out", str(tmp_path / "cut")])
    assert load(tmp_path / "cut" / "latest.pt")["step"] == 5
    monkeypatch.undo()
    script = iter(knn[2:])
    monkeypatch.setattr(train, "knn_evaluate", lambda *a, **k: (next(script), 0.0))
    train.main([*args, "--out", str(tmp_path / "cut"), "--resume"])
    full, again = load(tmp_path / "full" / "latest.pt"), load(tmp_path / "cut" / "latest.pt")
    assert {k: again[k] for k in Monitor().state_dict()} == {k: full[k] for k in Monitor().state_dict()}
    assert full["reg_scale"] == pytest.approx(0.01)
    assert all(torch.equal(full[p][k], again[p][k])
               for p in ("encoder", "predictor", "target_encoder") for k in full[p])
    assert log_rows(tmp_path / "cut" / "log.csv") == log_rows(tmp_path / "full" / "log.csv")
    assert "\n# resumed at step 5: torch=" in open(tmp_path / "cut" / "log.csv").read()  # where, and on what


def test_ddp_two_processes_match_one_process(tmp_path):
    data = make_folder(str(tmp_path / "data"), n_per_class=8)
    common = ["--data", data, "--steps", "3", "--seed", "3", "--rgb-aux", "0.1", "--sigreg", "0.5",  # all losses
              *TINY, *FLOAT32]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(HERE, "train.py"), *common, "--batch-size", "4", "--device", "cpu",
                    "--out", str(tmp_path / "ddp")], check=True, env=env, cwd=HERE, capture_output=True)
    # the reference: one process with twice the batch, on the same device as the DDP run
    train.main([*common, "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "one")])
    train.main([*common, "--batch-size", "8", "--device", "cpu", *NO_STEP, "--out", str(tmp_path / "start")])
    assert_trained_alike(*(load(tmp_path / run / "latest.pt") for run in ("ddp", "one", "start")),
                         ("encoder", "predictor", "target_encoder", "rgb_head"))


SIGNAL_RUN = ["--steps", "40", "--batch-size", "4", "--save-every", "10", "--knn-every", "0", *TINY, *FLOAT32,
              "--log-every", "5"]


def test_kill_and_resume_gives_same_weights_and_log(tmp_path):
    data = make_folder(str(tmp_path / "data"), n_per_class=10)
    common = ["--data", data, "--steps", "12", "--batch-size", "4", "--save-every", "4", *TINY, "--workers", "2",
              "--rgb-aux", "0.1", *EXACT]  # the small preset's pixel head resumes too
    assert run_train(*common, "--out", str(tmp_path / "full")).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *common, "--out", str(out)], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # run_train's threads: the same sums
    while proc.poll() is None and not ((out / "latest.pt").exists() and len(log_rows(out / "log.csv")) > 6):
        time.sleep(0.01)  # a checkpoint (step 4) and log rows past it (step 5 on)
    proc.kill()  # SIGKILL, between two saves
    proc.wait()
    killed_at = load(out / "latest.pt")["step"]
    assert killed_at < 12, "the kill landed after the run ended: nothing was tested"
    resumed = run_train(*common, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    full, again = load(tmp_path / "full" / "latest.pt"), load(out / "latest.pt")
    assert again["step"] == 12
    for part in ("encoder", "predictor", "target_encoder", "rgb_head"):
        assert all(torch.equal(full[part][k], again[part][k]) for k in full[part]), part  # bit for bit
    assert again["monitor_reference"] == full["monitor_reference"]  # the collapse monitor's step-0 yardstick survives
    assert log_rows(out / "log.csv") == log_rows(tmp_path / "full" / "log.csv")  # rows past the kill trimmed, redone


def test_preload_leaves_training_bit_identical(tmp_path, monkeypatch):
    args = ["--data", make_folder(str(tmp_path / "data")), "--steps", "3", "--batch-size", "4", *TINY, *EXACT]
    train.main([*args, "--out", str(tmp_path / "memory")])
    monkeypatch.setattr(data, "PRELOAD_LIMIT", 0)  # nothing fits: every image decoded at every use, as before
    train.main([*args, "--out", str(tmp_path / "lazy")])
    a, b = load(tmp_path / "memory" / "latest.pt"), load(tmp_path / "lazy" / "latest.pt")
    assert all(torch.equal(a[p][k], b[p][k]) for p in ("encoder", "predictor", "target_encoder") for k in a[p])


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    common = ["--data", make_folder(str(tmp_path / "data"), n_per_class=10), *SIGNAL_RUN, *EXACT]
    assert run_train(*common, "--out", str(tmp_path / "full")).returncode == 0  # same threads as the runs below
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *common, "--out", str(out)], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not (out / "latest.pt").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # a real signal to a real process, mid-run
    stdout, stderr = proc.communicate()
    assert proc.returncode == checkpoint.STOPPED_BY_SIGNAL and "stopped by a signal" in stdout, stderr
    stopped_at = load(out / "latest.pt")["step"]
    assert 10 <= stopped_at < 40
    assert run_train(*common, "--out", str(out), "--auto-resume").returncode == 0
    full, again = load(tmp_path / "full" / "latest.pt"), load(out / "latest.pt")
    for part in ("encoder", "predictor", "target_encoder"):
        assert all(torch.equal(full[part][k], again[part][k]) for k in full[part]), part  # bit for bit
    assert log_rows(out / "log.csv") == log_rows(tmp_path / "full" / "log.csv")  # no row twice, none missing


def test_torchrun_stopped_by_sigterm_resumes(tmp_path):
    common = ["--data", make_folder(str(tmp_path / "data"), n_per_class=10), *SIGNAL_RUN, "--seed", "2"]
    ddp = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(HERE, "train.py"),
           *common, "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *ddp], cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while not (tmp_path / "ddp" / "latest.pt").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every worker
    proc.communicate()
    assert 10 <= load(tmp_path / "ddp" / "latest.pt")["step"] < 40
    subprocess.run([sys.executable, *ddp, "--resume"], cwd=HERE, env=env, check=True, capture_output=True)
    train.main([*common, "--device", "cpu", "--out", str(tmp_path / "one")])  # one process, the whole batch
    train.main([*common, "--device", "cpu", *NO_STEP, "--out", str(tmp_path / "start")])
    assert load(tmp_path / "ddp" / "latest.pt")["step"] == 40
    assert_trained_alike(*(load(tmp_path / run / "latest.pt") for run in ("ddp", "one", "start")),
                         ("encoder", "predictor", "target_encoder"))


@CUDA
def test_gpu_checkpoint_resumes_on_the_cpu_and_back(tmp_path, monkeypatch):
    common = ["--data", make_folder(str(tmp_path / "data")), "--steps", "6", "--batch-size", "4", *TINY,
              "--out", str(tmp_path / "o")]
    for leg, (device, resume) in enumerate((("cuda", []), ("cpu", ["--resume"]), ("cuda", ["--resume"]))):
        if leg < 2:
            stop_after(monkeypatch, 2)  # stopped as by SIGTERM after two steps, then resumed on the other device
        with pytest.raises(SystemExit) if leg < 2 else nullcontext():
            train.main([*common, "--device", device, *resume])
        monkeypatch.undo()
    ckpt = load(tmp_path / "o" / "latest.pt")
    assert ckpt["step"] == 6 and len(log_rows(tmp_path / "o" / "log.csv")) == 7  # header + one row a step
    assert all(torch.isfinite(v).all() for p in ("encoder", "predictor", "target_encoder") for v in ckpt[p].values())


@CUDA
def test_gpu_batches_arrive_whole_through_pinned_non_blocking_copies(tmp_path, monkeypatch):
    seen, step = {"cuda": [], "cpu": []}, train.train_step

    def step_and_keep(nets, optimizer, scaler, autocast, imgs, *rest, **kw):
        seen[imgs.device.type].append(imgs.cpu())  # waits for the copy: what the step read
        return step(nets, optimizer, scaler, autocast, imgs, *rest, **kw)

    monkeypatch.setattr(train, "train_step", step_and_keep)
    common = ["--data", make_folder(str(tmp_path / "data"), n_per_class=10), "--steps", "6", "--batch-size", "4", *TINY,
              "--workers", "2"]  # pinned by the loader's thread, copied while the previous step runs
    for device in ("cuda", "cpu"):
        train.main([*common, "--device", device, "--out", str(tmp_path / device)])
    assert len(seen["cuda"]) == 6 and all(torch.equal(a, b) for a, b in zip(seen["cuda"], seen["cpu"]))


def test_teacher_of_another_shape_and_vicreg_on_one_image_are_one_line(tmp_path):
    data = make_folder(str(tmp_path / "data"))
    base = ["--data", data, *TINY, "--steps", "1", "--batch-size", "4"]
    train.main([*base, "--out", str(tmp_path / "teacher")])
    for flags, names in ((["--target", "frozen", "--teacher", str(tmp_path / "teacher" / "latest.pt"), "--depth", "2"],
                          "--teacher"), (["--batch-size", "1", "--vicreg", "1"], "--vicreg")):
        with pytest.raises(SystemExit) as e:
            train.main([*base, *flags, "--out", str(tmp_path / "o")])
        assert str(e.value.code).startswith("error:") and names in str(e.value.code) and "\n" not in str(e.value.code)


FUZZ = {"--depth": ["0", "1", "2"], "--pred-dim": ["48", "32", "50", "0"], "--pred-depth": ["0", "1"],
        "--batch-size": ["0", "1", "4", "500"], "--img-size": ["32", "16", "30"], "--patch-size": ["8", "4", "0"],
        "--steps": ["0", "1", "2"], "--lr": ["-1", "0", "1e-3"], "--num-targets": ["0", "1", "9"],
        "--target-scale": [["0.1", "0.2"], ["0.5", "1.5"], ["0", "0.1"]], "--context-scale": [["0.1", "0.2"]],
        "--min-keep": ["0", "4", "100"], "--ema": [["1.5", "1"], ["0.9", "0.99"]], "--target": ["shared", "frozen"],
        "--loss": ["l2", "cosine"], "--vicreg": ["-1", "1"], "--invariance": ["1"], "--view-size": ["16", "12", "0"],
        "--target-layers": ["0", "2", "13"], "--rgb-aux": ["0.1"], "--knn-every": ["1"], "--save-every": ["0"],
        "--log-every": ["0"], "--warmup": ["-1", "0"], "--workers": ["-1"], "--teacher": ["nowhere.pt"],
        "--val-data": ["/nonexistent/val"], "--dtype": ["bfloat16"]}


@pytest.mark.parametrize("seed", range(3))
def test_flag_fuzz_trains_or_fails_in_one_line(tmp_path, seed, capsys):
    rng = np.random.default_rng(seed)
    no_val = make_folder(str(tmp_path / "no_val"), n_per_class=6)  # 12 images, no val/: kNN flags must refuse
    for trial in range(12):
        argv = ["--data", no_val, *TINY, "--steps", "1", "--batch-size", "4", "--out", str(tmp_path / f"o{trial}")]
        for flag in rng.choice(list(FUZZ), size=int(rng.integers(1, 5)), replace=False):
            value = FUZZ[flag][int(rng.integers(len(FUZZ[flag])))]
            argv += [flag, *([value] if isinstance(value, str) else value)]
        try:
            train.main(argv)
        except SystemExit as e:
            message = str(e.code)
            assert message.startswith("error:") and "\n" not in message and "--" in message, (argv, message)
        capsys.readouterr()


def test_run_records_what_decides_its_numbers_in_its_log_summary_and_checkpoint(tmp_path):
    summary = train.main(["--data", make_folder(str(tmp_path / "data")), "--steps", "2", "--batch-size", "4", *TINY,
                          *FLOAT32, "--out", str(tmp_path / "o")])
    said = {"torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": "float32"}
    assert {k: summary[k] for k in said} == said and summary["cpu"] == machine.facts(torch.device("cpu"),
                                                                                     torch.float32)["cpu"]
    first = open(tmp_path / "o" / "log.csv").readline()
    assert first == "# " + " ".join(f"{k}={v}" for k, v in load(tmp_path / "o" / "latest.pt")["machine"].items()) + "\n"
    assert f"threads={torch.get_num_threads()} cpu=" in first and " " not in summary["cpu"]


def test_label_free_statistics_leave_every_other_column_bit_identical(tmp_path, monkeypatch):
    common = ["--data", knn_folder(str(tmp_path / "data")), "--steps", "4", "--batch-size", "4", "--knn-every", "2",
              *TINY, "--probe"]
    train.main([*common, "--out", str(tmp_path / "with")])
    monkeypatch.setattr(train, "label_free_stats", lambda *a: {})  # the same run without them
    train.main([*common, "--out", str(tmp_path / "without")])
    with_them, without = csv_rows(tmp_path / "with" / "log.csv"), csv_rows(tmp_path / "without" / "log.csv")
    free = ("lidar", "rankme", "alpha_req", "img_per_s")
    assert [{k: v for k, v in r.items() if k not in free} for r in with_them] == [
        {k: v for k, v in r.items() if k not in free} for r in without]
    assert [bool(r["lidar"]) for r in with_them] == [False, True, False, True]  # at each evaluation, steps 2 and 4
    assert all(float(r["lidar"]) >= 1 and float(r["rankme"]) >= 1 for r in with_them if r["lidar"])


def test_probe_at_each_evaluation_is_eval_knn_probe_of_the_same_features(tmp_path):
    root = str(tmp_path / "data")  # random images: a probe far from 100%, so its figure means something
    make_folder(os.path.join(root, "train"), n_per_class=8), make_folder(os.path.join(root, "val"), 4, seed=1)
    train.main(["--data", root, "--steps", "4", "--batch-size", "4", "--knn-every", "4", "--probe", *TINY,
                *FLOAT32, "--out", str(tmp_path / "o")])
    logged = float(csv_rows(tmp_path / "o" / "log.csv")[-1]["probe_top1"])
    encoder, sets = eval_knn.load_encoder(str(tmp_path / "o" / "latest.pt")), data.make_datasets(root, 32, 0)[1:]
    (x, y), (xv, yv) = (eval_knn.extract_features(encoder, torch.utils.data.DataLoader(s, batch_size=256),
                                                  torch.device("cpu")) for s in sets)
    assert logged == eval_knn.linear_probe(x, y, xv, yv)[0]


def test_stop_at_saves_and_exits_as_a_signal_would(tmp_path):
    r = run_train("--data", make_folder(str(tmp_path / "data")), "--steps", "6", "--batch-size", "4", *TINY,
                  "--stop-at", "3", "--out", str(tmp_path / "o"))
    assert r.returncode == checkpoint.STOPPED_BY_SIGNAL and "stopped by --stop-at after step 3/6" in r.stdout
    assert load(tmp_path / "o" / "latest.pt")["step"] == 3


def test_study_replay_reruns_a_row_and_compares_with_its_committed_log(tmp_path):
    data = tmp_path / "data"
    for split, n in (("train", 32), ("val", 4)):
        make_folder(str(data / split), n_per_class=n)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGS": str(tmp_path / "logs")}

    def replay(out):
        return subprocess.run(["bash", "study.sh", str(data), "plain"], cwd=HERE, capture_output=True, text=True,
                              env={**env, "OUT": str(tmp_path / out), "REPLAY": "2"})
    assert replay("first").returncode != 0  # no committed log yet: the check fails, it does not pass by default
    os.makedirs(tmp_path / "logs" / "plain")
    committed = tmp_path / "logs" / "plain" / "log.csv"
    committed.write_text(open(tmp_path / "first" / "plain" / "log.csv").read())
    r = replay("again")
    assert r.returncode == 0 and "1 rows x 23 columns" in r.stdout and r.stdout.strip().endswith("equal"), r.stdout
    rows = committed.read_text().split("\n")
    rows[2] = rows[2].replace(",", ",9", 3)  # the committed loss altered: the replay must say so
    committed.write_text("\n".join(rows))
    r = replay("third")
    assert r.returncode != 0 and "step 1 loss: committed 9" in r.stdout, r.stdout


def test_readme_step_in_your_own_loop_runs_alone_on_the_four_concept_files(tmp_path):
    readme = open(os.path.join(HERE, "README.md")).read()
    block = code_block(readme[readme.index("## The step in your own loop"):], "import torch")
    out = run_alone(tmp_path, ["models.py", "masks.py", "ema.py", "losses.py"], block)
    losses_seen = [float(x) for x in re.findall(r"step \d: loss ([\d.]+)", out)]
    assert len(losses_seen) == 3 and all(math.isfinite(v) and v > 0 for v in losses_seen), out


# --------------------------------------------------------------------------------------------------- eval_knn.py

def test_knn_separable_toy_set_is_perfect():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(5, 16), dim=1)
    labels = torch.arange(200) % 5
    bank = F.normalize(centres[labels] + 0.05 * torch.randn(200, 16), dim=1)
    queries = F.normalize(centres[labels[:50]] + 0.05 * torch.randn(50, 16), dim=1)
    assert eval_knn.knn_classify(bank, labels, queries, labels[:50], chunk=7) == (100.0, 100.0)


def test_knn_query_set_smaller_than_chunk_matches_loop():
    torch.manual_seed(1)
    bank, bank_labels = F.normalize(torch.randn(60, 8), dim=1), torch.randint(0, 3, (60,))
    queries, labels = F.normalize(torch.randn(3, 8), dim=1), torch.randint(0, 3, (3,))
    correct = 0
    for q, y in zip(queries, labels):  # the naive weighted vote, one query at a time
        sim = bank @ q
        top = sim.topk(20)
        votes = torch.zeros(3).index_add_(0, bank_labels[top.indices], (top.values / 0.07).exp())
        correct += int(votes.argmax() == y)
    top1, top5 = eval_knn.knn_classify(bank, bank_labels, queries, labels, chunk=1024)
    assert top1 == pytest.approx(100 * correct / 3) and top5 == 100.0  # 3 classes: top-5 holds all


def naive_knn(bank, bank_labels, queries, query_labels, k, temperature, num_classes):
    """One query at a time: cosine similarities, the k nearest, exp(sim / T) votes -> (top-1 %, top-5 %, whether
    every query's top 5 is free of ties between classes without votes, so that top-5 is well defined)."""
    top1 = top5 = 0
    defined = True
    for q, y in zip(F.normalize(queries, dim=1), query_labels.tolist()):
        sims = [(float(F.normalize(b, dim=0) @ q), int(label)) for b, label in zip(bank, bank_labels)]
        votes = [0.0] * num_classes
        for sim, label in sorted(sims, reverse=True)[:k]:
            votes[label] += math.exp(sim / temperature)
        ranked = sorted(range(num_classes), key=lambda c: -votes[c])
        top1, top5 = top1 + (ranked[0] == y), top5 + (y in ranked[:5])
        defined &= sum(v > 0 for v in votes) >= 5
    return 100.0 * top1 / len(queries), 100.0 * top5 / len(queries), defined


@pytest.mark.parametrize("k, temperature, chunk", [(20, 0.07, 1024), (5, 0.5, 7), (1, 0.07, 13), (100, 1.0, 50)])
def test_knn_matches_naive_loop_over_many_queries(k, temperature, chunk):
    g = torch.Generator().manual_seed(k)
    centres = torch.randn(8, 16, generator=g)
    bank_labels, query_labels = torch.randint(0, 8, (100,), generator=g), torch.randint(0, 8, (60,), generator=g)
    bank = centres[bank_labels] + 1.5 * torch.randn(100, 16, generator=g)  # overlapping classes: votes matter
    queries = centres[query_labels] + 1.5 * torch.randn(60, 16, generator=g)
    top1, top5 = eval_knn.knn_classify(bank, bank_labels, queries, query_labels, k, temperature, chunk)
    expected_top1, expected_top5, top5_defined = naive_knn(bank, bank_labels, queries, query_labels, min(k, 100),
                                                           temperature, 8)
    assert top1 == pytest.approx(expected_top1) and 0 < expected_top1 < 100  # neither trivial nor hopeless
    assert top5 == pytest.approx(expected_top5) or not top5_defined


def test_linear_probe_separates_a_separable_set_and_not_random_labels():
    torch.manual_seed(0)
    centres = 3 * torch.randn(4, 16)
    y, yv = torch.arange(200) % 4, torch.arange(100) % 4
    x, xv = centres[y] + torch.randn(200, 16), centres[yv] + torch.randn(100, 16)
    assert eval_knn.linear_probe(x, y, xv, yv)[0] == 100.0
    noise, noise_val = torch.randn(400, 32), torch.randn(400, 32)  # labels that nothing predicts
    top1 = eval_knn.linear_probe(noise, torch.randint(0, 4, (400,)), noise_val, torch.randint(0, 4, (400,)))[0]
    assert 15.0 < top1 < 35.0  # chance is 25%; 400 queries put 2 standard deviations at +-4.3 points


def test_linear_probe_chooses_its_strength_by_the_best_holdout_score():
    fit, held = eval_knn.holdout_split(120, seed=0)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(120)) and len(held) == 24  # training rows only
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(120, 8, generator=g), torch.randint(0, 3, (120,), generator=g)
    x[:, 0] += 1.5 * y  # a weak signal, so the strengths score differently
    xv, yv = torch.randn(60, 8, generator=g), torch.randint(0, 3, (60,), generator=g)
    xv[:, 0] += 1.5 * yv
    mean, std = x.mean(0), x.std(0) + 1e-6  # the probe's standardisation, then each strength scored by hand
    X, Xv = ((x - mean) / std).double(), ((xv - mean) / std).double()

    def score(l2, rows_x, rows_y):
        W, b = eval_knn.fit_logistic(X[fit], y[fit], l2, 3)
        return ((rows_x @ W + b).argmax(1) == rows_y).double().mean().item()

    holdout = [score(l2, X[held], y[held]) for l2 in eval_knn.STRENGTHS]
    on_val = [score(l2, Xv, yv) for l2 in eval_knn.STRENGTHS]
    best = holdout.index(max(holdout))  # the first (strongest) of the best
    assert best != on_val.index(max(on_val)) and best != holdout.index(min(holdout))  # the test can tell
    assert eval_knn.linear_probe(x, y, xv, yv)[1] == eval_knn.STRENGTHS[best]


def test_linear_probe_standardises_with_the_training_rows_statistics():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 4, generator=g), torch.randint(0, 2, (200,), generator=g)
    x[:, 0] += 2.0 * y
    xv, yv = torch.randn(100, 4, generator=g), torch.randint(0, 2, (100,), generator=g)
    xv[:, 0] += 2.0 * yv
    xv[:, 1:] *= 30  # the validation rows' noise grows: a probe fitted with training statistics is misled by it
    top1, l2 = eval_knn.linear_probe(x, y, xv, yv)

    def by_hand(mean, std):  # the chosen strength refit on every training row, then scored on the validation rows
        W, b = eval_knn.fit_logistic(((x - mean) / std).double(), y, l2, 2)
        return 100.0 * ((((xv - mean) / std).double() @ W + b).argmax(1) == yv).double().mean().item()

    assert top1 == by_hand(x.mean(0), x.std(0) + 1e-6)
    assert top1 < by_hand(xv.mean(0), xv.std(0) + 1e-6) - 10  # the validation rows' own statistics would hide it


def test_linear_probe_and_knn_refuse_non_finite_features():
    x, y = torch.randn(20, 4), torch.arange(20) % 2
    bad = x.clone()
    bad[3, 1] = float("nan")
    for call in (lambda: eval_knn.linear_probe(bad, y, x, y), lambda: eval_knn.linear_probe(x, y, bad, y),
                 lambda: eval_knn.knn_classify(x, y, bad, y)):
        with pytest.raises(SystemExit, match="non-finite"):
            call()


def test_official_format_checkpoint_gives_same_accuracy(tmp_path, capsys):
    data = knn_folder(str(tmp_path / "data"))
    train.main(["--data", os.path.join(data, "train"), "--steps", "1", "--batch-size", "4",
                "--out", str(tmp_path / "o"), *TINY])
    ours = load(tmp_path / "o" / "latest.pt")
    official = {part: {"module." + k: v for k, v in ours[part].items()}
                for part in ("encoder", "predictor", "target_encoder")}
    torch.save({**official, "epoch": 1}, tmp_path / "official.pth.tar")
    results = []
    for ckpt in (tmp_path / "o" / "latest.pt", tmp_path / "official.pth.tar"):
        eval_knn.main(["--ckpt", str(ckpt), "--data", data, "--workers", "0", "--k", "3"])
        results.append(capsys.readouterr().out.splitlines()[-1])
    assert results[0] == results[1] and results[0].startswith("summary: knn_top1=")
    enc = eval_knn.load_encoder(str(tmp_path / "official.pth.tar"))
    assert (enc.embed_dim, len(enc.blocks), enc.patch_size, enc.grid) == (192, 12, 8, (4, 4))


def test_evaluation_without_val_folder_is_one_clear_line(tmp_path):
    make_folder(str(tmp_path / "data" / "train"))  # no val/
    with pytest.raises(SystemExit) as e:
        eval_knn.main(["--random-init", "--patch-size", "8", "--img-size", "16", "--data", str(tmp_path / "data"),
                       "--workers", "0"])
    assert "val" in str(e.value.code) and "\n" not in str(e.value.code)


def test_random_init_evaluation_runs(tmp_path, capsys):
    data = knn_folder(str(tmp_path / "data"))
    eval_knn.main(["--random-init", "--model", "vit_tiny", "--patch-size", "8", "--img-size", "16", "--data", data,
                   "--workers", "0", "--k", "3"])
    top1 = float(capsys.readouterr().out.splitlines()[-1].split("knn_top1=")[1].split()[0])
    assert 0.0 <= top1 <= 100.0


def test_knn_and_probe_import_and_run_with_torch_alone(tmp_path):
    code = ("import torch\nfrom eval_knn import knn_classify, linear_probe\n"
            "g = torch.Generator().manual_seed(0)\n"
            "y = torch.arange(40) % 2\nx = torch.randn(40, 4, generator=g) + 10 * torch.eye(4)[y]\n"
            "print(knn_classify(x, y, x, y, k=5)[0], linear_probe(x, y, x, y)[0])\n")
    out = run_alone(tmp_path, ["eval_knn.py", "export.py", "models.py", "masks.py", "checkpoint.py"], code)
    assert [float(v) for v in out.split()] == [100.0, 100.0]


# ----------------------------------------------------------------------------------------------------- export.py

def hf_forward(hf, config, x):
    """IJepaModel's forward written out from the exported names alone: separate query, key and value
    projections, heads split by channel blocks, LayerNorm eps 1e-6 from config.json."""
    D, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]
    p = config["patch_size"]

    def lin(h, name):
        return h @ hf[name + ".weight"].T + hf[name + ".bias"]

    def norm(h, name):
        return F.layer_norm(h, (D,), hf[name + ".weight"], hf[name + ".bias"], eps)

    patches = "embeddings.patch_embeddings.projection."
    h = F.conv2d(x, hf[patches + "weight"], hf[patches + "bias"], stride=p).flatten(2).transpose(1, 2)  # (B, N, D)
    h = h + hf["embeddings.position_embeddings"]
    B, T, _ = h.shape
    for i in range(config["num_hidden_layers"]):
        layer = f"encoder.layer.{i}."
        a = norm(h, layer + "layernorm_before")
        q, k, v = (lin(a, layer + f"attention.attention.{n}").reshape(B, T, heads, D // heads).transpose(1, 2)
                   for n in ("query", "key", "value"))
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(D // heads)).softmax(-1) @ v  # (B, heads, T, D/heads)
        h = h + lin(att.transpose(1, 2).reshape(B, T, D), layer + "attention.output.dense")
        mlp = F.gelu(lin(norm(h, layer + "layernorm_after"), layer + "intermediate.dense"))
        h = h + lin(mlp, layer + "output.dense")
    return norm(h, "layernorm")


def test_export_hf_maps_back_exactly_and_its_forward_matches_ours(tmp_path):
    train.main(["--data", make_folder(str(tmp_path / "data")), "--steps", "1", "--batch-size", "4", *TINY,
                "--depth", "2", "--out", str(tmp_path / "run")])
    ckpt = str(tmp_path / "run" / "latest.pt")
    export.main([ckpt, "--to", "hf", str(tmp_path / "hf"), "--which", "context"])
    config = json.load(open(tmp_path / "hf" / "config.json"))
    hf = export.read_safetensors(str(tmp_path / "hf" / "model.safetensors"))
    ours = load(ckpt)["encoder"]
    back = export.from_hf(hf, config["num_hidden_layers"])
    assert back.keys() == ours.keys() and all(torch.equal(back[k], v) for k, v in ours.items())
    encoder = eval_knn.load_encoder(ckpt, "context").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf_forward(hf, config, x), encoder(x), atol=1e-5, rtol=1e-5)
    assert config["layer_norm_eps"] == 1e-6 and config["intermediate_size"] == 4 * config["hidden_size"]
    with pytest.raises(SystemExit, match="already holds an export"):  # an export is never overwritten
        export.main([ckpt, "--to", "hf", str(tmp_path / "hf")])


def test_export_official_file_and_timm_state_dict(tmp_path):
    train.main(["--data", make_folder(str(tmp_path / "data")), "--steps", "1", "--batch-size", "4", *TINY,
                "--depth", "2", "--out", str(tmp_path / "run")])
    ours = load(tmp_path / "run" / "latest.pt")
    official = {part: {"module." + k: v for k, v in ours[part].items()} for part in ("encoder", "target_encoder")}
    torch.save({**official, "epoch": 1}, tmp_path / "official.pth.tar")  # the official layout: no config
    export.main([str(tmp_path / "official.pth.tar"), "--to", "timm", str(tmp_path / "timm.pt")])
    timm_state = load(tmp_path / "timm.pt")
    assert timm_state.keys() == ours["target_encoder"].keys()
    assert all(torch.equal(timm_state[k], v) for k, v in ours["target_encoder"].items())
    export.main([str(tmp_path / "official.pth.tar"), "--to", "hf", str(tmp_path / "hf")])
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["hidden_size"], config["num_hidden_layers"], config["patch_size"], config["image_size"]) == (
        192, 2, 8, 32)


def trained_run(tmp_path):
    """A 1-step run of a 2-deep ViT-Tiny/8 at 32 px -> its latest.pt."""
    train.main(["--data", make_folder(str(tmp_path / "data")), "--steps", "1", "--batch-size", "4", *TINY,
                "--depth", "2", "--out", str(tmp_path / "run")])
    return str(tmp_path / "run" / "latest.pt")


@pytest.mark.parametrize("kind", ["ours", "official", "hf", "timm", "timm-safetensors"])
def test_every_format_reads_back_the_encoder_it_was_written_from(tmp_path, kind):
    ckpt = trained_run(tmp_path)
    path = {"ours": ckpt, "official": str(tmp_path / "official.pth.tar"), "hf": str(tmp_path / "hf"),
            "timm": str(tmp_path / "timm.pt"), "timm-safetensors": str(tmp_path / "timm.safetensors")}[kind]
    torch.save({part: {"module." + k: v for k, v in load(ckpt)[part].items()}
                for part in ("encoder", "target_encoder", "predictor")}, tmp_path / "official.pth.tar")
    if kind in ("hf", "timm"):
        export.main([ckpt, "--to", kind, path, "--which", "context"])
    export.write_safetensors(load(ckpt)["encoder"], str(tmp_path / "timm.safetensors"))
    which = "target" if kind in ("ours", "official") else "context"  # the one encoder of an export: the context
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours, back = (export.load_encoder(p, which).eval()(x) for p in (ckpt, path))
    torch.testing.assert_close(back, ours, atol=1e-6, rtol=1e-6)


def test_a_path_of_no_known_kind_is_one_line_naming_the_kinds(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    os.makedirs(tmp_path / "folder")
    for path in (tmp_path / "other.pt", tmp_path / "folder"):
        with pytest.raises(SystemExit, match="is none of the kinds read here: our checkpoint .*transformers.*timm"):
            export.load_encoder(str(path))


def test_transformers_loads_the_export_with_the_same_features(tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt = trained_run(tmp_path)
    export.main([ckpt, "--to", "hf", str(tmp_path / "hf"), "--which", "context"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = transformers.IJepaModel.from_pretrained(str(tmp_path / "hf")).eval()(pixel_values=x).last_hidden_state
        torch.testing.assert_close(theirs, export.load_encoder(ckpt, "context").eval()(x), atol=1e-5, rtol=1e-5)


def test_timm_loads_the_export_with_the_same_features(tmp_path):
    timm = pytest.importorskip("timm")
    ckpt = trained_run(tmp_path)
    export.main([ckpt, "--to", "timm", str(tmp_path / "timm.pt")])
    config = load(ckpt)["config"]["encoder"]
    model = eval(export.timm_line(config), {"timm": timm})  # the line export.py prints
    model.load_state_dict(load(tmp_path / "timm.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = export.load_encoder(ckpt).eval()(x).mean(dim=1)
        torch.testing.assert_close(model.eval()(x), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ours", "hf"])
def test_init_starts_a_run_from_pretrained_weights_at_step_zero(tmp_path, kind):
    ckpt = trained_run(tmp_path)
    source = ckpt if kind == "ours" else str(tmp_path / "hf")
    if kind == "hf":
        export.main([ckpt, "--to", "hf", source, "--which", "context"])
    common = ["--data", make_folder(str(tmp_path / "data2")), "--steps", "1", "--batch-size", "4", *TINY,
              "--depth", "2", *NO_STEP, "--ema", "1", "1", "--wd", "0", "--final-wd", "0"]  # a step that moves nothing
    summary = train.main([*common, "--init", source, "--out", str(tmp_path / "init")])
    fresh, before = load(tmp_path / "init" / "latest.pt"), load(ckpt)
    assert fresh["step"] == 1 and fresh["args"]["init"] == source and summary["init"] == source
    assert open(tmp_path / "init" / "log.csv").readline().rstrip().endswith(f"init={source}")
    parts = ("encoder", "target_encoder", "predictor") if kind == "ours" else ("encoder",)
    for part in parts:
        assert all(torch.equal(fresh[part][k], v) for k, v in before[part].items()), part
    if kind == "hf":  # one encoder, for both; the predictor from scratch, not the source's
        assert all(torch.equal(fresh["target_encoder"][k], v) for k, v in before["encoder"].items())
        assert not torch.equal(fresh["predictor"]["mask_token"], before["predictor"]["mask_token"])


def test_init_of_another_shape_is_one_line(tmp_path):
    ckpt = trained_run(tmp_path)
    r = run_train("--data", make_folder(str(tmp_path / "data2")), "--steps", "1", "--batch-size", "4", *TINY,
                  "--init", ckpt, "--out", str(tmp_path / "o"))  # a 12-deep run from a 2-deep file
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "depth 2" in r.stderr, r.stderr
    assert "--init" in r.stderr and "depth 12" in r.stderr


def test_probe_features_of_the_last_k_blocks_are_each_normed_pooled_and_concatenated():
    encoder = models.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2).eval()
    images = [(torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)), i % 2) for i in range(6)]
    loader = torch.utils.data.DataLoader(images, batch_size=4)
    one, labels = eval_knn.extract_features(encoder, loader, torch.device("cpu"))
    two = eval_knn.extract_features(encoder, loader, torch.device("cpu"), layers=2)[0]
    x = torch.stack([img for img, _ in images])
    with torch.no_grad():  # the blocks run by hand
        h, outs = encoder.patch_embed(x) + encoder.pos_embed, []
        for blk in encoder.blocks:
            h = blk(h)
            outs.append(encoder.norm(h).mean(dim=1))
    torch.testing.assert_close(one, outs[-1])
    torch.testing.assert_close(two, torch.cat(outs[-2:], dim=1))
    assert two.shape == (6, 64) and labels.tolist() == [0, 1, 0, 1, 0, 1]


# ------------------------------------------------------------------------------------------------------ bench.py

def test_bench_times_the_step_in_both_precisions_and_says_which_train_picks(capsys):
    bench.main(["--repeats", "1", "--data", "demo", "--batch-size", "4", *TINY, *FLOAT32, "--depth", "1"])
    out = capsys.readouterr().out
    picked = re.search(r"precision   train.py picks (\w+) here", out).group(1)
    assert "step in float32" in out and "step in bfloat16" in out and picked in ("float32", "bfloat16")
    assert "float32 on cpu" in out  # the figures above are for --dtype when given


def test_bench_profile_kinds_by_hand():
    kind = lambda name: next((k for k, p in bench.KINDS if re.search(p, name, re.IGNORECASE)), "other")  # noqa
    names = {"flash_fwd_kernel": "attention", "fmha_cutlassB_f32_aligned_64x64_k64_sm80": "attention",
             "nvjet_tst_128x64_64x8_1x1_v_bz_coopA_TNN": "matmul", "sm90_xmma_gemm_bf16bf16_bf16f32": "matmul",
             "aten::mm": "matmul", "aten::addmm": "matmul", "aten::softmax": "attention",
             "void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda>": "dtype casts",
             "aten::copy_": "dtype casts", "aten::native_layer_norm": "LayerNorm", "aten::_fused_adamw_": "AdamW, EMA",
             "multi_tensor_apply_kernel<LerpFunctor>": "AdamW, EMA", "aten::sum": "reductions",
             "aten::gelu": "elementwise", "MmBackward0": "other", "aten::mmx": "elementwise"}
    assert {name: kind(name) for name in names} == names


def test_bench_profile_split_adds_up_to_the_profiled_time(capsys):
    bench.main(["--data", "demo", "--steps", "2", "--batch-size", "4", *TINY, "--repeats", "1", "--profile"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("profile")]
    parts, whole = [float(r[-3]) for r in rows[:-1]], float(rows[-1][2])
    assert len(parts) >= 4 and sum(parts) == pytest.approx(whole, abs=0.01 * len(parts))
    assert sum(float(r[-1].rstrip("%")) for r in rows[:-1]) == pytest.approx(100, abs=0.1 * len(parts))


# ------------------------------------------------------------------------------------------ figures.py, study.sh

def test_study_spearman_matches_pearson_of_ranks_by_hand():
    # the study's "does the loss tell you anything" number: Spearman = Pearson correlation of the ranks
    a, b = [0.3, 0.1, 0.7, 0.5, 0.2], [36.0, 12.5, 20.1, 41.0, 30.0]
    ra = [sorted(a).index(x) for x in a]
    rb = [sorted(b).index(x) for x in b]
    ma, mb = sum(ra) / 5, sum(rb) / 5
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    naive = cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    assert figures.spearman(a, b) == pytest.approx(naive) and abs(naive) < 1  # a mixed order, not a trivial +-1
    assert figures.spearman(a, [-x for x in a]) == pytest.approx(-1.0)


def test_study_rule_for_a_difference_by_hand():
    # RESULTS.md's rule: seed ranges that do not overlap; a single seed outside the range by more than its width
    plain = [35.0, 38.0]  # width 3: a single seed must fall under 32 or over 41
    assert figures.against([30.0, 31.0], plain) == "below" and figures.against([34.0, 36.0], plain) == "within"
    assert figures.against([31.5], plain) == "below" and figures.against([32.5], plain) == "within"
    assert figures.against([41.5], plain) == "above" and figures.against([40.5], plain) == "within"
    assert figures.against(plain, [31.5]) == "above" and figures.against([36.0], [20.0]) == "?"


def test_study_seed_groups_and_table(tmp_path):
    names = ["plain", "plain-s1", "plain-s2", "plain-sigreg-proj-0.09", "plain-sigreg-proj-0.09-s1", "plain-ema-0"]
    assert figures.seed_groups(names) == {"plain": ["plain", "plain-s1", "plain-s2"], "plain-ema-0": ["plain-ema-0"],
                                          "plain-sigreg-proj-0.09": ["plain-sigreg-proj-0.09",
                                                                     "plain-sigreg-proj-0.09-s1"]}
    scored = (("plain", 36.6, 50.65), ("plain-s1", 38.0, 49.0), ("plain-s2", 35.0, 51.0), ("small", 45.0, 50.0),
              ("small-s1", 47.0, 51.0), ("small-x", 37.0, 50.5), ("small-x-s1", 38.0, 50.5),
              ("plain-y", 30.0, 40.0), ("plain-y-s1", 31.0, 41.0), ("plain-y-lower", 33.0, 40.5),
              ("plain-y-lower-s1", 34.0, 45.0), ("small-lower", 46.0, 50.0), ("small-lower-s1", 47.0, 51.0))
    for run, knn, probe in scored:
        open(tmp_path / f"{run}.eval", "w").write(f"summary: knn_top1={knn} linear_top1={probe}\n")
    rule_rows = ["plain-y", "plain-y-s1", "plain-y-lower", "plain-y-lower-s1", "small-lower", "small-lower-s1"]
    table = figures.seed_table(str(tmp_path), names + ["small", "small-s1", "small-x", "small-x-s1"] + rule_rows)
    # a rule's row is judged against the same row without the rule, and against plain when that row is not plain
    assert ("| plain-y-lower | 2 | 33.50 (33.00-34.00) | 42.75 (40.50-45.00) | plain-y; plain | "
            "above / within; below / below |") in table
    assert "| small-lower | 2 | 46.50 (46.00-47.00) | 50.50 (50.00-51.00) | small | within / within |" in table
    assert "| plain | 3 | 36.53 (35.00-38.00) | 50.22 (49.00-51.00) | - | - / - |" in table and "ema" not in table
    # a departure from the small preset is judged against the small preset; the preset itself against plain
    assert "| small | 2 | 46.00 (45.00-47.00) | 50.50 (50.00-51.00) | plain | above / within |" in table
    assert "| small-x | 2 | 37.50 (37.00-38.00) | 50.50 (50.50-50.50) | small | below / within |" in table
    logs = [{"step": [390, 780, 1170], "knn_top1": [30.0, 32.0, None]}, {"step": [390, 780], "knn_top1": [28.0, 36.0]}]
    assert figures.mean_band(logs, "knn_top1") == ([390, 780], [29.0, 34.0], [28.0, 32.0], [30.0, 36.0])
    assert [figures.panel_of(n) for n in ("plain-ema-0", "plain-sigreg-shared", "plain-targets-small", "small",
                                          "small-lower", "plain-early-stop")] == [0, 1, 3, 4, 5, 5]


def test_study_label_free_table_by_hand(tmp_path):
    def log(knn, probe, lidar, std):  # three evaluations, steps 1-3, the other statistics flat
        return {"step": [1, 2, 3], "knn_top1": knn, "probe_top1": probe, "lidar": lidar, "rankme": [5.0] * 3,
                "alpha_req": [1.0] * 3, "std_mean": std, "eff_rank": [3.0] * 3, "sigreg": [1.0] * 3,
                "token_share": [0.5] * 3, "loss": [0.3] * 3}
    logs = {"a": log([30.0, 40.0, 35.0], [40.0, 45.0, 44.0], [5.0, 7.0, 6.0], [0.2, 0.2, 0.2]),  # LiDAR picks kNN's
            "b": log([20.0, 25.0, 30.0], [30.0, 31.0, 33.0], [9.0, 8.0, 7.0], [0.2, 0.2, 0.2]),  # 10 / 3 points off
            "c": log([10.0, 12.0, 11.0], [20.0, 21.0, 22.0], [3.0, 2.0, 4.0], [0.2, 0.2, 0.01])}  # c collapses
    for name, knn, probe in (("a", 36.0, 46.0), ("b", 31.0, 34.0), ("c", 11.0, 22.0)):
        open(tmp_path / f"{name}.eval", "w").write(f"summary: knn_top1={knn} linear_top1={probe}\n")
    table = figures.label_free_table(str(tmp_path), logs)
    # final LiDAR 6, 7, 4 against kNN 36, 31, 11: ranks (2, 3, 1) vs (3, 2, 1), rho 0.5; c collapsed (std 0.2 ->
    # 0.01): 2 runs left, too few for a rank correlation. Lost: a 0 / 0, b 10 / 3 (step 1 against step 3), c 1 / -1
    # (step 3 against step 2): mean 11/3 and 2/3
    assert "| lidar | highest | +0.50 / +0.50 (3) | +nan / +nan (2) | 3.67 / 10.00 | 0.67 / 3.00 | 2 of 3 |" in table


def test_study_early_stop_replay_by_hand():
    steps = [1, 390, 780, 1170, 1560, 1950, 2340, 2730]
    logs = {"peaks": {"step": steps, "knn_top1": [None, 30.0, 31.0, 31.2, 30.0, 29.0, 31.4, 20.0]},
            "rises": {"step": steps, "knn_top1": [None, 30.0, 31.0, 32.0, 33.0, 34.0, 35.0, 36.0]}}
    # patience 3, margin 0.5: 31.2, 30.0 and 29.0 do not beat 31.0 by 0.5; the third of them, at 1950, stops it
    replay = figures.replay_early_stop(logs, patience=3, margin=0.5)
    assert replay == {"peaks": (1950, 780, 31.2, 31.4), "rises": (None, 0, 36.0, 36.0)}


def test_feature_colours_take_the_position_away_and_follow_the_content():
    g = torch.Generator().manual_seed(0)
    position, content = torch.randn(1, 16, 8, generator=g) * 10, torch.randn(8, generator=g)
    amount = torch.rand(20, generator=g)  # how much of one direction each image holds, at every patch
    colours = figures.pca_colours(position + amount[:, None, None] * content, shown=list(range(20)))
    assert colours.shape == (20, 16, 3) and colours.min() >= 0 and colours.max() <= 1
    first = colours[:, 0, 0]  # the first component follows the content alone: the order of `amount`, or its reverse
    assert torch.equal(first.argsort(), amount.argsort()) or torch.equal(first.argsort(), amount.argsort().flip(0))


def test_study_salt_stage_two_follows_its_own_seeds_stage_one(tmp_path):
    # SALT is one run in two stages: stage 2 of seed S sits after stage 1 of seed S on the step axis
    for run, last in (("plain-salt-1", 1950), ("plain-salt-1-s1", 1000), ("plain-salt-2", 10), ("plain-salt-2-s1", 10)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "log.csv").write_text(f"step,knn_top1\n{last},\n")
    logs = figures.study_runs(str(tmp_path))
    assert logs["plain-salt-2"]["step"] == [1960] and logs["plain-salt-2-s1"]["step"] == [1010]
    assert logs["plain-salt-1-s1"]["step"] == [1000]
