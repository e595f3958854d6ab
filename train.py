"""I-JEPA pre-training: one loop for one CPU, one GPU, or many GPUs and nodes through torchrun.

    python train.py                                    # demo: built-in data, trains and evaluates in minutes on a CPU
    python train.py --data ./imagenet                  # the official ImageNet recipe (README lists what differs)
    torchrun --nproc_per_node=8 train.py --data ./imagenet

The step, in the order of the paper (Sec. 3): the target encoder embeds the whole image without
gradients; its features are layer-normalised and gathered at the target blocks; the context
encoder embeds the context patches only; the predictor predicts the target features from them; the
loss is backpropagated into the context encoder and predictor; the target encoder follows by EMA.
"""
import argparse
import csv
import math
import os
import random
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import models
from ema import ema_update, make_target, momentum_at
from eval_knn import MEAN, STD, CenterCrop, ImageFolder, knn_evaluate, load_checkpoint, load_encoder, to_tensor
from losses import collapse_stats, jepa_loss, vicreg_loss
from masks import apply_masks, sample_masks

# Defaults for real data: the official ImageNet recipe (configs/in1k_vith14_ep300.yaml), except the
# model (ViT-B/16 fits one GPU; the paper's ViT-H/14 needs many). Flags left unset take these values.
IMAGENET = dict(model="vit_base", img_size=224, patch_size=16, batch_size=128, epochs=300, lr=1e-3, start_lr=2e-4,
                final_lr=1e-6, warmup=40, wd=0.04, final_wd=0.4, ema=[0.996, 1.0], pred_depth=12, pred_dim=384)
# The demo: built-in images, trained and evaluated on a 2-core CPU in about 4 minutes. A 6-deep
# ViT-Tiny doubles the steps per minute; the VICReg term (C-JEPA) is what makes it learn in that
# budget: without it the same 500 steps left kNN at random-init level (README, stability study).
DEMO = dict(model="vit_tiny", depth=6, img_size=32, patch_size=4, batch_size=64, steps=500, lr=1e-3, start_lr=2e-4,
            final_lr=1e-6, warmup=1, wd=0.04, final_wd=0.4, ema=[0.996, 1.0], pred_depth=3, pred_dim=96, vicreg=1.0,
            workers=0)
for defaults in (IMAGENET, DEMO):  # the switches of the small preset below stay off, as the paper
    defaults.update(loss="smooth_l1", invariance=0.0, view_size=None, view_color=0.4, target_layers=1, rgb_aux=0.0)
IMAGENET.update(vicreg=0.0, workers=8)
# --preset small: small data sets on a CPU (README, 'Small data'). Plain I-JEPA at this scale peaks within a few hundred
# steps and then loses kNN accuracy; three departures from the paper, each measured there, make it keep learning:
# C-JEPA's invariance to a second view (crop + flip; colour jitter measured worse here) and multi-layer targets carry it
# to about ten minutes; a pixel loss on the predictions (--rgb-aux) carries it on from there. The second view is embedded
# at 16 px, a quarter of the tokens: 1.3x the steps per minute, and at a fixed time the extra steps won (README). So did
# a smaller encoder: a 4-deep ViT-Tiny runs 2.1x the steps of a 4-deep ViT-Small and ends higher at 10 minutes.
# 25 epochs of 10,000 images: ~10 minutes on the 2-core AVX-512 CPU.
SMALL = dict(DEMO, model="vit_tiny", depth=4, steps=None, epochs=25, warmup=3, loss="l2", invariance=5.0, view_size=16,
             view_color=0.0, target_layers=4, rgb_aux=1.0)
PRESETS = {"imagenet": IMAGENET, "demo": DEMO, "small": SMALL}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="I-JEPA pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--data", default="demo", help="'demo' (built in) or an ImageFolder ROOT; ROOT/train is used if present")
    p.add_argument("--val-data", default=None, help="kNN queries (default ROOT/val if present); the bank is the train set")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="values for the flags left unset: default 'demo' for --data demo, else 'imagenet' (the official recipe); "
                        "'small' is the small-data recipe (README)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader processes; default 8 (JPEG decoding needs several per GPU), demo 0 (its images are cheap to draw)")
    # model
    p.add_argument("--model", default=None, help="encoder (official sizes); default vit_base, demo vit_tiny")
    p.add_argument("--depth", type=int, default=None, help="encoder depth, overriding the model's (demo: 6 for speed)")
    p.add_argument("--img-size", type=int, default=None, help="crop size in pixels; default 224, demo 32")
    p.add_argument("--patch-size", type=int, default=None, help="patch side; default 16, demo 4 (an 8x8 grid at 32 px)")
    p.add_argument("--pred-depth", type=int, default=None, help="predictor depth; 12 as official (narrow and deep, Sec. 5)")
    p.add_argument("--pred-dim", type=int, default=None, help="predictor width; 384 as official")
    # optimisation
    p.add_argument("--batch-size", type=int, default=None, help="images per process per step; default 128 (official per GPU)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data; official 300")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps; overrides --epochs")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate; official 1e-3")
    p.add_argument("--start-lr", type=float, default=None, help="learning rate at step 0; official 2e-4")
    p.add_argument("--final-lr", type=float, default=None, help="learning rate at the end of the cosine; official 1e-6")
    p.add_argument("--warmup", type=float, default=None, help="linear warm-up, in epochs; official 40 of 300")
    p.add_argument("--wd", type=float, default=None, help="weight decay at the start; official 0.04")
    p.add_argument("--final-wd", type=float, default=None, help="weight decay at the end (cosine ramp); official 0.4")
    p.add_argument("--ema", type=float, nargs=2, default=None, metavar=("START", "END"),
                   help="target momentum, linear ramp; official 0.996 1.0. Lower values let the target chase the student")
    # masks
    p.add_argument("--num-targets", type=int, default=4, help="target blocks per image; 4 as the paper")
    p.add_argument("--target-scale", type=float, nargs=2, default=[0.15, 0.2], metavar=("LO", "HI"),
                   help="target block area; 0.15-0.2 as the paper: large enough to be semantic")
    p.add_argument("--target-aspect", type=float, nargs=2, default=[0.75, 1.5], metavar=("LO", "HI"), help="target aspect h/w")
    p.add_argument("--context-scale", type=float, nargs=2, default=[0.85, 1.0], metavar=("LO", "HI"),
                   help="context block area before the targets are removed; 0.85-1.0 as the paper: an informative context")
    p.add_argument("--min-keep", type=int, default=10, help="fewest context patches per image; 10 as official")
    # loss and the collapse study
    p.add_argument("--loss", default=None, choices=["smooth_l1", "l2", "cosine"], help="smooth_l1 as the official code; small preset l2 (the paper's Eq. 1)")
    p.add_argument("--target-norm", default="layernorm", choices=["layernorm", "none"],
                   help="layer-normalise target features (official); keeps their scale fixed")
    p.add_argument("--vicreg", type=float, default=None, help="weight of VICReg variance+covariance on pooled context features (C-JEPA); default 0 = off as official, demo 1.0")
    p.add_argument("--target", default="ema", choices=["ema", "shared", "frozen"],
                   help="ema: EMA copy with stop-gradient (I-JEPA); shared: one encoder, gradients through both branches; frozen: never updated")
    p.add_argument("--teacher", default=None, help="with --target frozen: checkpoint whose target encoder is the teacher")
    p.add_argument("--rgb-aux", type=float, default=None,
                   help="weight of an auxiliary pixel loss: a linear head on the predictions regresses the target patches' "
                        "normalised pixels (MAE-style); default 0 = off, as the paper; small preset 1")
    p.add_argument("--color-aug", type=float, default=0.0, metavar="S",
                   help="hand-crafted views (off as the paper): the context encoder sees a colour-jittered copy (strength S, e.g. 0.4) of the image the target encoder sees")
    p.add_argument("--invariance", type=float, default=None, metavar="W",
                   help="hand-crafted views (off as the paper): weight of C-JEPA's invariance term, 1 - cos between the pooled context "
                        "features and the target encoder's pooled features of a second view (crop, flip, colour jitter); 0 = off")
    p.add_argument("--view-scale", type=float, nargs=2, default=[0.3, 1.0], metavar=("LO", "HI"),
                   help="with --invariance: area of the second view's crop, as a fraction of the training crop")
    p.add_argument("--view-size", type=int, default=None, metavar="PX",
                   help="with --invariance: side of the second view in pixels (default --img-size); a smaller view is cheaper to embed")
    p.add_argument("--view-color", type=float, default=None, metavar="S",
                   help="with --invariance: colour-jitter strength of the second view; default 0.4, small preset 0")
    p.add_argument("--target-layers", type=int, default=None, metavar="K",
                   help="targets are the mean of the target encoder's last K blocks, each layer-normalised (data2vec); "
                        "default 1 = the output, as I-JEPA; small preset 4")
    p.add_argument("--stop-on-collapse", action="store_true", help="end the run when the collapse monitor fires")
    # system
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="autocast precision; default bfloat16 (as official) where the hardware has it, else float32 on CPU, float16 on old GPUs")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile encoder and predictor (dynamic shapes: context lengths vary)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order, crops and masks")
    p.add_argument("--out", default="runs/demo", help="directory for latest.pt and log.csv")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest.pt")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    p.add_argument("--knn-every", type=int, default=0, help="steps between kNN evaluations (0: only at the end)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset or ("demo" if args.data == "demo" else "imagenet")]
    for key, value in preset.items():
        if getattr(args, key) is None and not (key == "steps" and args.epochs is not None):  # --epochs beats a preset step count
            setattr(args, key, value)
    if args.model not in models.VIT_CONFIGS:
        raise SystemExit(f"error: unknown --model {args.model}: choose from {', '.join(models.VIT_CONFIGS)}")
    if args.img_size % args.patch_size:
        raise SystemExit(f"error: --img-size {args.img_size} is not divisible by --patch-size {args.patch_size}")
    if args.view_size and args.view_size % args.patch_size:
        raise SystemExit(f"error: --view-size {args.view_size} is not divisible by --patch-size {args.patch_size}")
    depth = models.vit_config(args.model, args.depth)["depth"]
    if not 1 <= args.target_layers <= depth:
        raise SystemExit(f"error: --target-layers {args.target_layers} must be between 1 and the encoder depth {depth}")
    if args.target == "frozen" and args.teacher is None and args.resume is False:
        print("note: --target frozen without --teacher: the target is the random-init encoder")
    return args


# ------------------------------------------------------------------------------------------------ data

class DemoTextures(torch.utils.data.Dataset):
    """The built-in demo data: 10 texture classes (stripes at four angles and two periods, checker,
    dots, rings, cross-hatch) drawn procedurally at any size, deterministic in (seed, index). Colours,
    phase, period, a small tilt and pixel noise are random, so neither raw pixels nor a random-init
    encoder (whose pooled features mostly reflect colour) sort them well; the class is the spatial
    pattern, exactly what predicting a masked block's features from its context has to capture."""

    def __init__(self, size, img_size, seed):
        self.size, self.img_size, self.seed = size, img_size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        rng, label, S = np.random.default_rng([self.seed, index]), index % 10, self.img_size
        yy, xx = np.meshgrid(np.arange(S) + 0.5, np.arange(S) + 0.5, indexing="ij")
        period, phase = rng.uniform(5, 8) * S / 32, rng.uniform(0, 2 * np.pi, size=2)

        def wave(angle, p=period):  # a plane wave at angle (degrees, +-8 jitter) and period p pixels
            a = np.deg2rad(angle + rng.uniform(-8, 8))
            return np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / p + phase[0])

        rings = np.hypot(xx - rng.uniform(0, S), yy - rng.uniform(0, S))
        pattern = [wave(0) > 0, wave(90) > 0, wave(45) > 0, wave(135) > 0, (wave(0) > 0) ^ (wave(90) > 0),
                   np.sin(2 * np.pi * xx / period + phase[0]) * np.sin(2 * np.pi * yy / period + phase[1]) > 0.5,
                   np.sin(2 * np.pi * rings / period) > 0, wave(0, 2.2 * period) > 0, wave(90, 2.2 * period) > 0,
                   (wave(45) > 0.3) | (wave(135) > 0.3)][label]
        fg, bg = rng.uniform(0, 1, size=(2, 3))
        bg = np.where(abs(fg - bg).mean() < 0.3, 1 - fg, bg)  # keep the pattern visible
        img = np.where(pattern[..., None], fg, bg) + rng.normal(0, 0.05, size=(S, S, 3))
        x = torch.from_numpy(np.clip(img, 0, 1)).permute(2, 0, 1).float()
        return (x - 0.5) / 0.25, label


class RandomResizedCrop:
    """Crop of random area (scale) and aspect ratio 3/4-4/3, resized to size (official transforms,
    no flip), as a pure function of (seed, epoch, index): a resumed run sees the very same crops."""

    def __init__(self, size, seed, scale=(0.3, 1.0)):
        self.size, self.seed, self.scale = size, seed, scale

    def __call__(self, img, key):
        rng, (W, H) = np.random.default_rng([self.seed, *key]), img.size
        for _ in range(10):
            area = W * H * rng.uniform(*self.scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= W and 0 < h <= H:
                left, top = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
                break
        else:  # fall back to the central square, as torchvision
            w = h = min(W, H)
            left, top = (W - w) // 2, (H - h) // 2
        return to_tensor(img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h)))


class StepBatches(torch.utils.data.Sampler):
    """This rank's share of the global batch of every step from `start` to `total`. Epoch e visits
    the data in the order of a permutation seeded by (seed, e); global batch j of an epoch is slice j
    of it, and rank r takes part r of that slice. So the data seen at a step depends on (seed, step)
    alone: resuming needs no replay, and N processes see exactly what one process with N times the
    batch would. Items are (index, epoch) pairs for the crop seed."""

    def __init__(self, n, batch_size, rank, world, seed, start, total):
        self.n, self.b, self.rank, self.world, self.seed, self.start, self.total = n, batch_size, rank, world, seed, start, total
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise SystemExit(f"error: {n} images cannot fill one global batch of {batch_size * world}: lower --batch-size")

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        for step in range(self.start, self.total):
            epoch, j = divmod(step, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            lo = (j * self.world + self.rank) * self.b
            yield [(i, epoch) for i in perm[lo:lo + self.b].tolist()]


def make_datasets(args):
    """(train set, kNN bank, kNN queries); the last two are None when there is no validation data."""
    if args.data == "demo":
        train = DemoTextures(10_000, args.img_size, seed=args.seed)
        return train, DemoTextures(2_000, args.img_size, seed=args.seed), DemoTextures(1_000, args.img_size, seed=10_000 + args.seed)
    if not os.path.isdir(args.data):
        raise SystemExit(f"error: --data {args.data} is not a folder")
    root = os.path.join(args.data, "train") if os.path.isdir(os.path.join(args.data, "train")) else args.data
    train = ImageFolder(root, RandomResizedCrop(args.img_size, args.seed))
    train.load(0)  # fails now, in one line, if no file in the folder decodes
    val_root = args.val_data or os.path.join(args.data, "val")
    if not os.path.isdir(val_root):
        return train, None, None
    return train, ImageFolder(root, CenterCrop(args.img_size)), ImageFolder(val_root, CenterCrop(args.img_size))


# --------------------------------------------------------------------------------------- schedules

def model_config(args):
    """Constructor arguments of encoder and predictor; stored in checkpoints so they rebuild themselves.
    The predictor has as many heads as the encoder, as in the official init_model."""
    vit = models.vit_config(args.model, args.depth)
    grid = args.img_size // args.patch_size
    return {"encoder": dict(img_size=args.img_size, patch_size=args.patch_size, **vit),
            "predictor": dict(num_patches=grid * grid, embed_dim=vit["embed_dim"], predictor_embed_dim=args.pred_dim,
                              depth=args.pred_depth, num_heads=vit["num_heads"])}


def lr_at(step, total, warmup, args):
    """Linear warm-up from start_lr to lr, then cosine to final_lr (official WarmupCosineSchedule)."""
    if step < warmup:
        return args.start_lr + (args.lr - args.start_lr) * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return args.final_lr + (args.lr - args.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def wd_at(step, total, args):
    """Cosine ramp of weight decay from wd to final_wd (official CosineWDSchedule)."""
    return args.final_wd + (args.wd - args.final_wd) * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def mask_generator(seed, step):
    """Masks are a function of (seed, step): every rank draws the global batch's and keeps its slice."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def make_optimizer(params, lr, wd):
    """AdamW; biases and 1-D parameters (LayerNorm) get no weight decay, as official. fused=True runs the
    whole update as one kernel instead of a dozen per-tensor ops (measured ~4% of the CPU step at bench (A))."""
    decay, no_decay = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, weight_decay=wd, fused=True)


def autocast_dtype(device, requested=None, log=print):
    """The --dtype asked for, else bfloat16 wherever the hardware computes it: CUDA GPUs since Ampere, CPUs with AVX-512 or AMX (oneDNN's
    bf16 kernels). Without them bf16 is emulated: on an AVX2-only CPU (AMD Zen 3) a bf16 matmul ran at ~1
    GFLOP/s against 76 for float32, so such CPUs get float32, and pre-Ampere GPUs float16 (with GradScaler)."""
    if requested:
        return getattr(torch, requested)
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] >= 8:  # Ampere and later
            return torch.bfloat16
        log("note: this GPU has no native bfloat16: float16 with loss scaling (--dtype float32 to avoid it)")
        return torch.float16
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log("note: this CPU has no native bfloat16 (no AVX-512/AMX): training in float32 (--dtype bfloat16 forces it)")
        return torch.float32
    return torch.bfloat16


def peak_mem_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash mid-save leaves the previous checkpoint whole.
    Non-finite weights are never written over a good checkpoint."""
    for part in ("encoder", "predictor", "target_encoder"):
        if not all(torch.isfinite(v).all() for v in state[part].values() if v.is_floating_point()):
            raise SystemExit(f"error: non-finite {part} weights at step {state['step']}; {path} keeps the last good state")
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = get_args(argv)
    # ---- device, precision, distributed: torchrun sets RANK; a plain run never touches torch.distributed
    ddp = "RANK" in os.environ
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    dtype = autocast_dtype(device, args.dtype, log)
    args.dtype = str(dtype).removeprefix("torch.")
    # bf16 has float32's exponent range, so gradients cannot underflow and need no GradScaler (the
    # official code uses one anyway); float16 does need one.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(args.seed)

    # ---- data
    train_set, bank_set, query_set = make_datasets(args)
    steps_per_epoch = len(train_set) // (args.batch_size * world)
    total = args.steps or args.epochs * steps_per_epoch
    warmup = min(int(args.warmup * steps_per_epoch), total // 2)
    grid = (args.img_size // args.patch_size,) * 2
    mask_kw = dict(num_targets=args.num_targets, target_scale=tuple(args.target_scale),
                   target_aspect=tuple(args.target_aspect), context_scale=tuple(args.context_scale), min_keep=args.min_keep)
    try:  # bad mask flags fail here, in one line, not at step 1000
        sample_masks(args.batch_size * world, grid, generator=mask_generator(args.seed, 0), **mask_kw)
    except ValueError as e:
        raise SystemExit(f"error: mask flags (--target-scale/--context-scale/--min-keep...): {e}") from None

    # ---- models: context encoder and predictor are trained; the target encoder only follows
    config = model_config(args)
    encoder = models.VisionTransformer(**config["encoder"]).to(device)
    predictor = models.VisionTransformerPredictor(**config["predictor"]).to(device)
    target_encoder = encoder if args.target == "shared" else make_target(encoder)
    if args.teacher:
        target_encoder.load_state_dict(load_encoder(args.teacher).state_dict())

    # optional pixel anchor (--rgb-aux): a linear head maps each prediction to its target patch's normalised pixels (MAE's
    # target, He et al. 2022). Off as the paper, whose claim is that latent targets suffice. On small data the latent
    # targets alone let the features drift after ~4,000 steps, trading the colour and layout that kNN reads for shape;
    # the pixel loss makes the context features keep what the masked patches look like, and the curve kept rising (README)
    rgb_head = torch.nn.Linear(encoder.embed_dim, 3 * args.patch_size**2).to(device) if args.rgb_aux > 0 else None
    trained = [m for m in (encoder, predictor, rgb_head) if m is not None]
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args.start_lr, args.wd)
    if args.target != "shared":  # the two properties that keep I-JEPA from collapsing (see ema.py)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert not any(id(p) in in_optimizer for p in target_encoder.parameters()), "target parameter in the optimizer"
        assert not any(p.requires_grad for p in target_encoder.parameters()), "target parameter requires grad"

    os.makedirs(args.out, exist_ok=True)
    ckpt_path, start, reference = os.path.join(args.out, "latest.pt"), 0, None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"error: --resume: no checkpoint at {ckpt_path}")
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("config") != config:
            raise SystemExit(f"error: --resume: {ckpt_path} was trained with another architecture "
                             f"({ckpt.get('config')}); pass the same --model/--img-size/--patch-size/--pred-* flags")
        encoder.load_state_dict(ckpt["encoder"])
        predictor.load_state_dict(ckpt["predictor"])
        if args.target != "shared":
            target_encoder.load_state_dict(ckpt["target_encoder"])
        if rgb_head is not None:
            rgb_head.load_state_dict(ckpt["rgb_head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_states(ckpt["rng"])
        start, reference = ckpt["step"], ckpt.get("monitor_reference")  # the collapse monitor keeps its step-0 yardstick
        log(f"resumed from {ckpt_path} at step {start}")

    raw_encoder, raw_predictor, raw_rgb_head = encoder, predictor, rgb_head  # unwrapped: what EMA reads and checkpoints store
    if ddp:  # only the trained modules are wrapped; the EMA target never is
        ids = [device.index] if device.type == "cuda" else None
        encoder = torch.nn.parallel.DistributedDataParallel(encoder, device_ids=ids)
        predictor = torch.nn.parallel.DistributedDataParallel(predictor, device_ids=ids)
        if rgb_head is not None:  # a trained module too: unwrapped, its gradients would differ between processes
            rgb_head = torch.nn.parallel.DistributedDataParallel(rgb_head, device_ids=ids)
    if args.compile:
        encoder, predictor = torch.compile(encoder, dynamic=True), torch.compile(predictor, dynamic=True)

    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=StepBatches(len(train_set), args.batch_size, rank, world, args.seed, start, total),
        num_workers=args.workers, pin_memory=device.type == "cuda")
    n_params = sum(p.numel() for p in params)
    log(f"I-JEPA: {args.model}/{args.patch_size} at {args.img_size}px ({grid[0]}x{grid[1]} patches), {n_params / 1e6:.1f}M "
        f"trained params, {len(train_set)} images, {world} process(es) x batch {args.batch_size}, {total} steps, "
        f"{args.dtype} on {device}, target={args.target}")

    # ---- the loop
    csv_file = open(os.path.join(args.out, "log.csv"), "a" if args.resume else "w", newline="") if master else None
    writer = csv.writer(csv_file) if master else None
    if master and not args.resume:
        writer.writerow(["step", "epoch", "loss", "lr", "wd", "momentum", "img_per_s", "std_mean", "std_min", "eff_rank", "knn_top1"])
    loss_value, stats, knn, timed_steps, timed_s = float("nan"), {}, None, 0, 0.0
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    t_last, step, t_start, collapse_warnings = time.perf_counter(), start, time.perf_counter(), 0
    for step, (imgs, _) in enumerate(loader, start=start):
        lr, wd, m = lr_at(step, total, warmup, args), wd_at(step, total, args), momentum_at(step, total, *args.ema)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.param_groups[0]["weight_decay"] = wd
        imgs = imgs.to(device, non_blocking=True)
        gen, rows = mask_generator(args.seed, step), slice(rank * args.batch_size, (rank + 1) * args.batch_size)
        masks_ctx, masks_tgt = [mk[rows].to(device) for mk in sample_masks(args.batch_size * world, grid, generator=gen, **mask_kw)]
        ctx_imgs = imgs if args.color_aug == 0 else color_distort(imgs, args.color_aug, torch.rand(args.batch_size * world, 4, generator=gen)[rows])
        if args.invariance > 0:  # a second, hand-crafted view of each image, for the target encoder
            view = random_view(imgs, tuple(args.view_scale), args.view_color, torch.rand(args.batch_size * world, 9, generator=gen)[rows].to(device),
                               args.view_size)

        with autocast:
            # stop-gradient: the target branch builds no graph, so the loss cannot move the target
            with torch.set_grad_enabled(args.target == "shared"):
                feats, h = target_features(target_encoder, imgs, args.target_layers, args.target_norm)  # (B, N, D) each
                if args.invariance > 0:
                    feats_view = target_encoder(view)  # (B, N', D)
                targets = apply_masks(h, masks_tgt)  # (B, M, Kt, D)
            z = encoder(ctx_imgs, masks_ctx)  # (B, Kc, D)
            preds = predictor(z, masks_ctx, masks_tgt)  # (B, M, Kt, D)
            loss = jepa_loss(preds, targets, args.loss, stop_gradient=args.target != "shared")
            if args.vicreg > 0:
                variance, covariance = vicreg_loss(z.mean(dim=1))
                loss = loss + args.vicreg * (variance + covariance)
            if args.invariance > 0:
                # C-JEPA's invariance: the pooled context (a masked view) must point where the target encoder's pooled
                # second view points. The target side is under no_grad and moves by EMA only, like the patch targets;
                # the VICReg term above keeps the pooled context from collapsing to one vector to satisfy it.
                loss = loss + args.invariance * jepa_loss(z.mean(dim=1), feats_view.mean(dim=1), "cosine")
            if rgb_head is not None:
                loss = loss + args.rgb_aux * F.mse_loss(rgb_head(preds), apply_masks(patch_pixels(imgs, args.patch_size), masks_tgt))
        loss_value = loss.item()  # a sync point, but it lets a bad step stop the run before it is saved
        if not math.isfinite(loss_value):
            raise SystemExit(f"error: loss is {loss_value} at step {step}; {ckpt_path} still holds the last good state")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if args.target == "ema":
            ema_update(target_encoder, raw_encoder, m)

        done = step + 1
        if step - start >= 3:  # steady-state throughput: the first steps pay for warm-up and allocation
            timed_steps, timed_s = timed_steps + 1, timed_s + time.perf_counter() - t_last
        if args.knn_every and done % args.knn_every == 0 and bank_set is not None and master:
            knn = run_knn(target_encoder, bank_set, query_set, args, device, dtype)
        if done % args.log_every == 0 or done == total or step == start:  # the first row is the monitor's reference
            stats = collapse_stats(feats.detach().mean(dim=1))
            reference = reference or stats
            step_s = timed_s / max(timed_steps, 1)
            img_s = args.batch_size * world / step_s if timed_steps else float("nan")
            mem = peak_mem_mb(device)
            log(f"step {done}/{total} ep {step // steps_per_epoch} loss {loss_value:.4f} lr {lr:.2e} wd {wd:.3f} "
                f"mom {m:.4f} | {img_s:.0f} img/s ETA {(total - done) * step_s / 60:.1f} min mem {mem:.0f}MB | "
                f"std {stats['std_mean']:.3f} (min {stats['std_min']:.3f}) rank {stats['eff_rank']:.1f}"
                + (f" | kNN {knn[0]:.1f}%" if knn else ""), flush=True)
            if master:
                writer.writerow([done, step // steps_per_epoch, loss_value, lr, wd, m, img_s, stats["std_mean"],
                                 stats["std_min"], stats["eff_rank"], knn[0] if knn else ""])
                csv_file.flush()
            if stats["std_mean"] < 0.1 * reference["std_mean"] or stats["eff_rank"] < 0.2 * reference["eff_rank"]:
                collapse_warnings += 1
                log(f"warning: representation collapse suspected at step {done}: std {stats['std_mean']:.4f} "
                    f"(start {reference['std_mean']:.4f}), eff_rank {stats['eff_rank']:.2f} (start {reference['eff_rank']:.2f})")
                if args.stop_on_collapse:
                    raise SystemExit(f"error: stopped on collapse at step {done} (--stop-on-collapse)")
        if master and (done % args.save_every == 0 or done == total):
            save_checkpoint(ckpt_path, {
                "encoder": raw_encoder.state_dict(), "predictor": raw_predictor.state_dict(),
                "target_encoder": target_encoder.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": done, "epoch": done // steps_per_epoch, "config": config,
                "args": vars(args), "rng": rng_states(), "monitor_reference": reference,
                **({"rgb_head": raw_rgb_head.state_dict()} if rgb_head is not None else {})})
        t_last = time.perf_counter()  # the next interval is data + step only, not kNN, logging or saving

    # ---- the end: kNN of the trained target encoder against a random-init encoder of the same shape
    summary = dict(steps=step + 1 - start if total > start else 0, loss=loss_value, img_per_s=args.batch_size * world * timed_steps / max(timed_s, 1e-9),
                   std_mean=stats.get("std_mean", float("nan")), eff_rank=stats.get("eff_rank", float("nan")),
                   peak_mem_mb=peak_mem_mb(device), collapse_warnings=collapse_warnings, train_s=time.perf_counter() - t_start)
    if bank_set is not None and master:
        torch.manual_seed(args.seed + 1)
        summary["knn_top1"] = run_knn(target_encoder, bank_set, query_set, args, device, dtype)[0]
        summary["knn_top1_random"] = run_knn(models.VisionTransformer(**config["encoder"]).to(device),
                                             bank_set, query_set, args, device, dtype)[0]
        log(f"kNN top-1 on held-out images: trained target encoder {summary['knn_top1']:.1f}%, "
            f"random init {summary['knn_top1_random']:.1f}%")
    log("summary: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    if ddp:
        dist.destroy_process_group()
    return summary


def color_distort(imgs, strength, draws):
    """A photometric view for the context branch only (--color-aug; off by default, as I-JEPA needs no
    hand-crafted views). Per image: brightness, contrast and saturation factors in [1-S, 1+S], then
    grayscale with probability 0.2, in [0, 1] pixel space. Geometry is untouched, so the masks address
    the same patches in both views; predicting the clean image's target features from a jittered
    context asks for colour invariance (on CIFAR it did not raise kNN: README). draws: (B, 4) uniforms,
    sliced from the global batch's. Demo images use another normalisation; there the jitter is approximate."""
    mean, std = MEAN.to(imgs.device)[:, None, None], STD.to(imgs.device)[:, None, None]
    f = (1 + strength * (2 * draws[:, :3] - 1)).to(imgs.device)[:, :, None, None, None]  # (B, 3, 1, 1, 1)

    def gray(t):  # (B, 1, H, W) luma
        return 0.299 * t[:, 0:1] + 0.587 * t[:, 1:2] + 0.114 * t[:, 2:3]

    x = (imgs * std + mean).mul(f[:, 0]).clamp(0, 1)  # brightness
    m = gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - m) * f[:, 1] + m).clamp(0, 1)  # contrast
    g = gray(x)
    x = ((x - g) * f[:, 2] + g).clamp(0, 1)  # saturation
    x = torch.where((draws[:, 3] < 0.2).to(imgs.device)[:, None, None, None], gray(x).expand_as(x), x)
    return (x - mean) / std


def random_view(imgs, scale, color, draws, size=None):
    """A second view of each image for --invariance: a random crop (area `scale` of the training crop,
    aspect 3/4-4/3), flipped with p=0.5, resized to size x size pixels (default: the input's size), then
    colour-jittered (`color_distort`) when color > 0. On tensors, one bilinear grid_sample for the batch,
    so it serves every data set, the demo included. imgs (B, 3, H, W), draws (B, 9) uniforms -> (B, 3, size, size)."""
    B = len(imgs)
    area = scale[0] + (scale[1] - scale[0]) * draws[:, 0]
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * draws[:, 1])
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # crop sides, fractions of the image
    flip = torch.where(draws[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=imgs.device)  # output (x, y) in [-1, 1] -> input coordinates
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, (1 - w) * (2 * draws[:, 2] - 1)
    theta[:, 1, 1], theta[:, 1, 2] = h, (1 - h) * (2 * draws[:, 3] - 1)
    grid = F.affine_grid(theta, [B, 3, size or imgs.shape[-2], size or imgs.shape[-1]], align_corners=False)
    view = F.grid_sample(imgs, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return color_distort(view, color, draws[:, 5:]) if color > 0 else view


def target_features(target_encoder, imgs, layers, norm):
    """The target encoder's output (B, N, D) and the regression targets h (B, N, D): with layers=1 the
    output, layer-normalised (official); with layers=K the mean of the last K blocks' outputs, each
    layer-normalised first (data2vec, Baevski et al. 2022; their scales differ, so `norm` applies to
    layers=1 only), which asks the predictor to recover several depths of the target at once."""
    if layers == 1:
        feats = target_encoder(imgs)
        return feats, F.layer_norm(feats, feats.shape[-1:]) if norm == "layernorm" else feats
    outs, hooks = [], [blk.register_forward_hook(lambda m, i, o: outs.append(F.layer_norm(o, o.shape[-1:])))
                       for blk in target_encoder.blocks[-layers:]]
    try:
        feats = target_encoder(imgs)
    finally:
        for hook in hooks:
            hook.remove()
    return feats, torch.stack(outs).mean(dim=0)


def patch_pixels(imgs, p):
    """(B, 3, H, W) -> (B, N, 3 p p) pixels per patch, each patch normalised to zero mean and unit
    variance (MAE's normalised-pixel target), in the patch order of the encoder."""
    x = imgs.unfold(2, p, p).unfold(3, p, p)  # (B, 3, H/p, W/p, p, p)
    x = x.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (B, N, 3 p p)
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()


def rng_states():
    """Every RNG state, as tensors and plain values (weights_only loading accepts nothing else). The
    pipeline seeds its own generators from (seed, step), so these matter only to user additions."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]], "python": random.getstate()}


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    keys, *rest = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])


def run_knn(encoder, bank_set, query_set, args, device, dtype):
    loaders = [torch.utils.data.DataLoader(s, batch_size=256, num_workers=args.workers) for s in (bank_set, query_set)]
    return knn_evaluate(encoder, *loaders, device, dtype)


if __name__ == "__main__":
    main()
