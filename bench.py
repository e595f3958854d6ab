"""Speed of the I-JEPA training step, the mask sampler and the data pipeline, against the machine's own peak.

    python bench.py --model vit_tiny --img-size 64 --patch-size 8 --batch-size 32 --pred-depth 6 --pred-dim 96 --dtype bfloat16

Times, after warm-up, the median of: the full step exactly as train.py runs it (target forward,
context encoder, predictor, loss, backward, AdamW, EMA) with the default masks; sample_masks for
the batch; and decode + random-resized-crop + collate of generated 500x375 JPEGs in one process.
FLOPs come from torch.utils.flop_counter (averaged over batches: context lengths vary); the peak is
a dense matmul of the same dtype measured in the same run, so MFU = achieved / measured peak.
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import models
import train
from ema import ema_update, make_target
from eval_knn import ImageFolder
from losses import jepa_loss
from masks import apply_masks, sample_masks


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def matmul_peak_tflops(device, dtype):
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_ms(lambda: a @ b, device, repeats=10) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_tiny", choices=list(models.VIT_CONFIGS))
    p.add_argument("--depth", type=int, default=None, help="encoder depth override, as train.py")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pred-depth", type=int, default=6)
    p.add_argument("--pred-dim", type=int, default=96)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default as train.py")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile encoder and predictor (dynamic shapes)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = train.autocast_dtype(device, args.dtype)
    args.dtype = str(dtype).removeprefix("torch.")
    torch.manual_seed(0)
    config = train.model_config(args)
    encoder = models.VisionTransformer(**config["encoder"]).to(device)
    predictor = models.VisionTransformerPredictor(**config["predictor"]).to(device)
    target_encoder = make_target(encoder)
    optimizer = train.make_optimizer([p for m in (encoder, predictor) for p in m.parameters()], 1e-4, 0.05)
    ctx_encoder, pred_net = encoder, predictor
    if args.compile:
        ctx_encoder, pred_net = torch.compile(encoder, dynamic=True), torch.compile(predictor, dynamic=True)
    grid, B = args.img_size // args.patch_size, args.batch_size
    imgs = torch.randn(B, 3, args.img_size, args.img_size, device=device)
    mask_gen, ctx_tokens = torch.Generator().manual_seed(0), []

    def step():  # the loop body of train.py with default flags
        masks_ctx, masks_tgt = (m.to(device) for m in sample_masks(B, grid, generator=mask_gen))
        ctx_tokens.append(masks_ctx.shape[1])
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                feats = target_encoder(imgs)
                targets = apply_masks(F.layer_norm(feats, feats.shape[-1:]), masks_tgt)
            loss = jepa_loss(pred_net(ctx_encoder(imgs, masks_ctx), masks_ctx, masks_tgt), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update(target_encoder, encoder, 0.996)
        return loss.item()

    flops = []
    for _ in range(3):
        with FlopCounterMode(display=False) as counter:
            step()
        flops.append(counter.get_total_flops())
    gflop = statistics.mean(flops) / 1e9
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ctx_tokens.clear()
    step_ms = median_ms(step, device, args.steps)
    mask_ms = median_ms(lambda: sample_masks(B, grid, generator=mask_gen), torch.device("cpu"), 20)
    peak = matmul_peak_tflops(device, dtype)
    tflops = gflop / step_ms
    mem = train.peak_mem_mb(device)

    with tempfile.TemporaryDirectory() as root:  # the data pipeline, one worker's throughput
        rng = np.random.default_rng(0)
        os.makedirs(os.path.join(root, "c"))
        for i in range(B):
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(os.path.join(root, "c", f"{i}.jpg"), quality=90)
        data = ImageFolder(root, train.RandomResizedCrop(args.img_size, seed=0))
        batch = [(i, 0) for i in range(B)]
        data_ms = median_ms(lambda: torch.utils.data.default_collate([data[item] for item in batch]), torch.device("cpu"), 5)

    img_s = B / step_ms * 1000
    print(f"{args.model}/{args.patch_size} at {args.img_size}px, batch {B}, predictor {args.pred_depth}x{args.pred_dim}, "
          f"{args.dtype} on {device}{' compiled' if args.compile else ''}")
    print(f"step        {step_ms:8.1f} ms  {img_s:8.1f} img/s  {gflop:.1f} GFLOP/step  {tflops:.3f} TFLOP/s  "
          f"MFU {tflops / peak:.1%} of {peak:.2f} TFLOP/s measured matmul peak")
    print(f"context     {statistics.mean(ctx_tokens):8.1f} tokens/image of {grid * grid}")
    print(f"masks       {mask_ms:8.2f} ms  ({mask_ms / step_ms:.2%} of the step)")
    print(f"data        {data_ms:8.1f} ms per batch per worker: {B / data_ms * 1000:.0f} img/s "
          f"(workers needed to keep up: {data_ms / step_ms:.1f})")
    print(f"peak memory {mem:8.0f} MB")
    print(f"summary: img_per_s={img_s:.1f} step_ms={step_ms:.1f} gflop_per_step={gflop:.2f} tflops={tflops:.3f} "
          f"mfu={tflops / peak:.3f} peak_tflops={peak:.3f} ctx_tokens={statistics.mean(ctx_tokens):.1f}")


if __name__ == "__main__":
    main()
