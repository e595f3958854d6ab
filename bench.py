"""Speed of the I-JEPA training step, the mask sampler and the data pipeline, against the machine's own peak.

    python bench.py --preset imagenet --model vit_tiny --img-size 64 --patch-size 8 --batch-size 32 \
        --pred-depth 6 --pred-dim 96 --dtype bfloat16     # config (A) of RESULTS.md
    python bench.py --preset small               # any train.py flags: the step that run would take

Takes train.py's own flags (the preset in force included) and times, after warm-up, the median of:
`train.train_step`, the very function train.py's loop calls (target forward, context encoder,
predictor, loss, backward, AdamW, EMA), on random images with the run's masks; sample_masks for the
batch; and decode + random-resized-crop + collate of generated 500x375 JPEGs in one process. FLOPs
come from torch.utils.flop_counter (averaged over batches: context lengths vary); the peak is a dense
matmul of the same dtype measured in the same run, so MFU = achieved / measured peak. `--profile` adds where
the step's time goes (torch.profiler): by kind of GPU kernel on a GPU (operators' own time on a CPU), the
kernels launched, and the GPU's idle share of the step, time it waited for the host. On a CPU it also times the
step in float32 and in bfloat16 and says which precision train.py picks here (machine.autocast_dtype).
"""
import argparse
import os
import re
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import config
import data
import machine
import train
from masks import sample_masks


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


# Kernel (GPU) or operator (CPU) names -> kinds, the first pattern that matches; attention before matmul, whose
# patterns its kernels share
KINDS = [("attention", r"flash|fmha|attention|softmax"), ("matmul", r"gemm|nvjet|xmma|cutlass|aten::(mm|addmm|bmm)$"),
         ("dtype casts", r"copy|convert|cast"), ("LayerNorm", r"layer_?norm"), ("AdamW, EMA", r"adam|lerp"),
         ("reductions", r"reduce|aten::(sum|mean|var|std|norm|max|min)$"), ("elementwise", r"elementwise|^aten::")]


def profile_step(step, device, steps=3):
    """Where `steps` calls of `step` spend their time, printed: kinds of kernel (KINDS), kernels a step, and on a
    GPU the share of the step it sat idle (host gaps: launches, syncs, Python). Times are under the profiler."""
    on_gpu = device.type == "cuda"
    sync(device)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall_ms = 1000 * (time.perf_counter() - t) / steps
    events = [e for e in prof.key_averages() if (e.device_type == DeviceType.CUDA) == on_gpu]
    split, launches = {}, sum(e.count for e in events) / steps
    for e in events:
        kind = next((k for k, pattern in KINDS if re.search(pattern, e.key, re.IGNORECASE)), "other")
        own_us = e.self_device_time_total if on_gpu else e.self_cpu_time_total
        split[kind] = split.get(kind, 0.0) + own_us / 1e3 / steps
    busy = sum(split.values())
    for kind, ms in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"profile     {kind:12s} {ms:8.2f} ms  {ms / busy:6.1%}")
    print(f"profile     {'all':12s} {busy:8.2f} ms in {launches:.0f} {'kernels' if on_gpu else 'operators'} a step of "
          f"{wall_ms:.2f} ms" + (f": the GPU idle {1 - busy / wall_ms:.0%} of it" if on_gpu else ""))
    return split, wall_ms


def batch_ms(batch_size, img_size):
    """The data pipeline, one worker's throughput: ms to decode, crop and collate a batch of ImageNet-sized JPEGs."""
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        os.makedirs(os.path.join(root, "c"))
        for i in range(batch_size):
            pixels = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, "c", f"{i}.jpg"), quality=90)
        images = data.ImageFolder(root, data.RandomResizedCrop(img_size, seed=0))
        batch = [(i, 0) for i in range(batch_size)]
        collate = torch.utils.data.default_collate
        return median_ms(lambda: collate([images[item] for item in batch]), torch.device("cpu"), 5)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " Other flags are train.py's.")
    p.add_argument("--repeats", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--profile", action="store_true", help="also print where the step's time goes (torch.profiler)")
    own, rest = p.parse_known_args(argv)
    args = config.get_args(rest)
    if args.deterministic:  # as train.py: its cost is one of the figures asked of bench.py
        machine.deterministic_mode()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    width = train.model_config(args)["encoder"]["embed_dim"]
    picked = machine.autocast_dtype(device, None, width=width)  # what train.py picks here (measured on a CPU)
    dtype = getattr(torch, args.dtype) if args.dtype else picked
    args.dtype = str(dtype).removeprefix("torch.")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(0)
    nets, optimizer, _ = train.build(args, device)
    train.wrap(nets, args, device, ddp=False)  # torch.compile with --compile, as train.py
    grid, B = args.img_size // args.patch_size, args.batch_size
    mask_kw = config.mask_settings(args)
    imgs = torch.randn(B, 3, args.img_size, args.img_size, device=device)
    mask_gen, ctx_tokens = torch.Generator().manual_seed(0), []

    def step(autocast=autocast):  # one iteration of train.py's loop, minus data loading and logging
        masks_ctx, masks_tgt = (m.to(device) for m in sample_masks(B, (grid, grid), generator=mask_gen, **mask_kw))
        ctx_tokens.append(masks_ctx.shape[1])
        view = None
        if args.invariance > 0:
            view = data.random_view(imgs, torch.rand(B, 5, generator=mask_gen).to(device), args.view_size)
        return train.train_step(nets, optimizer, scaler, autocast, imgs, masks_ctx, masks_tgt,
                                0.996 if args.target == "ema" else None, view=view,
                                sigreg_generator=torch.Generator().manual_seed(0), **config.loss_settings(args))

    flops = []
    for _ in range(3):
        with FlopCounterMode(display=False) as counter:
            step()
        flops.append(counter.get_total_flops())
    gflop = statistics.mean(flops) / 1e9
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ctx_tokens.clear()
    step_ms = median_ms(step, device, own.repeats)
    mask_ms = median_ms(lambda: sample_masks(B, (grid, grid), generator=mask_gen, **mask_kw), torch.device("cpu"), 20)
    peak = matmul_peak_tflops(device, dtype)
    tflops = gflop / step_ms
    mem = machine.peak_mem_mb(device)

    data_ms = batch_ms(B, args.img_size)
    img_s = B / step_ms * 1000
    print(f"{args.model}/{args.patch_size} at {args.img_size}px, batch {B}, "
          f"predictor {args.pred_depth}x{args.pred_dim}, "
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
    if device.type == "cpu":  # the step in both precisions, beside the choice a linear layer's speed made
        speeds = {}
        for other in (torch.float32, torch.bfloat16):
            ms = median_ms(lambda: step(torch.autocast("cpu", dtype=other, enabled=other != torch.float32)), device,
                           own.repeats)
            speeds[str(other)[6:]] = B / ms * 1000
            print(f"step in {str(other)[6:]:8s} {ms:8.1f} ms  {B / ms * 1000:8.1f} img/s")
        print(f"precision   train.py picks {str(picked)[6:]} here; the step: bfloat16 at "
              f"{speeds['bfloat16'] / speeds['float32']:.2f}x float32")
    if own.profile:
        profile_step(step, device)


if __name__ == "__main__":
    main()
