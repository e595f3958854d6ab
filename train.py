"""I-JEPA pre-training: one loop for one CPU, one GPU, or many GPUs and nodes through torchrun.

    python train.py                              # the demo: built-in data, trains and evaluates in minutes on a CPU
    python train.py --data ./imagenet            # the official ImageNet recipe (README lists what differs)
    torchrun --nproc_per_node=8 train.py --data ./imagenet

The file reads in the order a run happens: presets and flags; the schedules, pure functions of the step;
the I-JEPA step (paper Sec. 3: the target encoder embeds the whole image without gradients, the context
encoder embeds the context patches, the predictor predicts the target features, the loss trains the
context encoder and predictor, the target follows by EMA); the networks; setting up and the monitor; then
main, in three phases: set up, the loop, the end. Restart safety (refusing to overwrite a run, atomic
saves, exact resume, stop signals, best.pt) is checkpoint.py's; the images are data.py's.
"""
import argparse
import csv
import gc
import math
import os
import resource
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import data
import models
from ema import ema_update, make_target, momentum_at
from eval_knn import knn_evaluate, load_encoder
from losses import (collapse_stats, collapse_suspected, jepa_loss, pixel_targets, sigreg, token_share,
                    vicreg_loss)
from masks import apply_masks, sample_masks

# ---------------------------------------------------------------------------------------------- presets
# Every flag a preset sets, complete. --preset picks one (default: demo for --data demo, else imagenet);
# an explicit flag always wins, and `--help` prints the defaults of the preset in force.

# The official ImageNet recipe (configs/in1k_vith14_ep300.yaml), except the model: ViT-B/16 fits one GPU.
IMAGENET = dict(model="vit_base", depth=None, img_size=224, patch_size=16, pred_depth=12, pred_dim=384,
                batch_size=128, epochs=300, steps=None, lr=1e-3, start_lr=2e-4, final_lr=1e-6, warmup=40, wd=0.04,
                final_wd=0.4, ema=[0.996, 1.0], loss="smooth_l1", vicreg=0.0, invariance=0.0, view_size=None,
                target_layers=1, rgb_aux=0.0, workers=8)
# The demo: built-in textures on a 2-core CPU in minutes. A 4-deep ViT-Tiny runs ~1.5x the steps of a
# 6-deep one; the VICReg term (C-JEPA) is what makes it learn in that budget (plain I-JEPA stays at
# random-init level there: EXPERIMENTS.md, the 200-step stability study).
DEMO = dict(IMAGENET, model="vit_tiny", depth=4, img_size=32, patch_size=4, pred_depth=3, pred_dim=96, batch_size=64,
            epochs=None, steps=400, warmup=1, vicreg=1.0, workers=0)
# Small data sets on a CPU (RESULTS.md, 'Small data'): plain I-JEPA peaks within a few hundred steps there,
# then loses kNN accuracy. Three departures, each measured, keep it learning: C-JEPA's invariance to a
# second view (crop + flip, at 16 px: a quarter of the tokens) and multi-layer targets carry it to ~10
# minutes, a pixel loss on the predictions carries it on to 30. 25 epochs of 10k images: ~10 min (AVX-512).
SMALL = dict(DEMO, steps=None, epochs=25, warmup=3, loss="l2", invariance=5.0, view_size=16, target_layers=4,
             rgb_aux=1.0)
PRESETS = {"imagenet": IMAGENET, "demo": DEMO, "small": SMALL}


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # the preset's value where there is one; nothing for "unset"
        return action.help if action.default is None else super()._get_help_string(action)


def make_parser(preset):
    """The flags, grouped as `--help` prints them; the preset's values are set as defaults by get_args."""
    p = argparse.ArgumentParser(description="I-JEPA pre-training. Defaults shown are those of the preset in force "
                                f"(here '{preset}'); `--preset small --help` shows another's.", allow_abbrev=False,
                                formatter_class=HelpWithDefaults)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", help="'demo' (built in) or an ImageFolder ROOT; ROOT/train is used if present")
    g.add_argument("--val-data", help="kNN queries (default ROOT/val if present); the bank is the training set")
    g.add_argument("--preset", choices=list(PRESETS), help="fills every flag below that is not given: the demo, "
                   "the official ImageNet recipe, or the small-data recipe")
    g.add_argument("--model", help="encoder size (official widths, depths and heads)")
    g.add_argument("--depth", type=int, help="encoder depth, overriding the model's (a shallower ViT is faster)")
    g.add_argument("--img-size", type=int, help="crop size in pixels")
    g.add_argument("--patch-size", type=int, help="patch side in pixels")
    g.add_argument("--pred-depth", type=int, help="predictor depth; official 12 (narrow and deep, paper Sec. 5)")
    g.add_argument("--pred-dim", type=int, help="predictor width; official 384")
    g = p.add_argument_group("optimisation (schedules are pure functions of the step)")
    g.add_argument("--batch-size", type=int, help="images per process per step; official 128 per GPU")
    g.add_argument("--epochs", type=int, help="passes over the data")
    g.add_argument("--steps", type=int, help="total optimizer steps; overrides --epochs")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--start-lr", type=float, help="learning rate at step 0, ramped linearly to --lr")
    g.add_argument("--final-lr", type=float, help="learning rate at the end of the cosine")
    g.add_argument("--warmup", type=float, help="linear warm-up, in epochs (at most half the run)")
    g.add_argument("--wd", type=float, help="weight decay at the start")
    g.add_argument("--final-wd", type=float, help="weight decay at the end (cosine ramp)")
    g = p.add_argument_group("masks (paper Sec. 3: large semantic targets, an informative context)")
    g.add_argument("--num-targets", type=int, default=4, help="target blocks per image")
    g.add_argument("--target-scale", type=float, nargs=2, default=[0.15, 0.2], metavar=("LO", "HI"),
                   help="target block area, a fraction of the image")
    g.add_argument("--target-aspect", type=float, nargs=2, default=[0.75, 1.5], metavar=("LO", "HI"),
                   help="target aspect h/w")
    g.add_argument("--context-scale", type=float, nargs=2, default=[0.85, 1.0], metavar=("LO", "HI"),
                   help="context block area before the targets are removed from it")
    g.add_argument("--min-keep", type=int, default=10, help="fewest context patches per image, as official")
    g.add_argument("--context", default="block", choices=["block", "complement"],
                   help="block: one large block minus the targets (I-JEPA); complement: everything outside the "
                        "targets (V-JEPA; with --num-targets 8 --target-scale 0.15 0.15 it hides ~80%% of the image)")
    g = p.add_argument_group("collapse study: each of I-JEPA's guards can be switched off")
    g.add_argument("--target", default="ema", choices=["ema", "shared", "frozen"],
                   help="ema: EMA copy behind a stop-gradient (I-JEPA); shared: one encoder, gradients through both "
                        "branches; frozen: never updated (SALT, with --teacher)")
    g.add_argument("--teacher", help="with --target frozen: a checkpoint whose target encoder is the frozen target")
    g.add_argument("--ema", type=float, nargs=2, metavar=("START", "END"),
                   help="target momentum, linear ramp; lower values let the target chase the student")
    g.add_argument("--loss", choices=["smooth_l1", "l2", "l1", "cosine"],
                   help="smooth_l1 as the official code, l2 as the paper's Eq. 1, l1 as V-JEPA")
    g.add_argument("--latent-weight", type=float, default=1.0,
                   help="weight of the latent prediction loss; 0 with --rgb-aux trains by pixels alone (SALT stage 1)")
    g.add_argument("--target-norm", default="layernorm", choices=["layernorm", "none"],
                   help="layer-normalise the target features (official); keeps their scale fixed")
    g.add_argument("--vicreg", type=float, help="weight of VICReg variance+covariance on the pooled context (C-JEPA)")
    g.add_argument("--sigreg", type=float, default=0.0, help="weight of LeJEPA's SIGReg on the pooled context "
                   "(an isotropic-Gaussian test; with --target shared, no stop-gradient and no EMA at all)")
    g.add_argument("--projector", type=int, default=0, metavar="DIM",
                   help="SIGReg reads a LeJEPA projector (2 x 2048 wide with BatchNorm, then DIM) of the pooled "
                        "context instead of the pooled context itself; with --target shared the prediction is also "
                        "compared in the projected space, both branches through it (LeWorldModel). 0: none")
    g = p.add_argument_group("acting on the monitor (the seed's fourth rule), at each --knn-every evaluation; all off "
                             "by default. Thresholds chosen on the study's logs (RESULTS.md, answer 7)")
    g.add_argument("--stop-on-collapse", action="store_true", help="end the run when the collapse monitor fires")
    g.add_argument("--early-stop", type=int, default=0, metavar="P", help="end the run once kNN has not beaten its "
                   "best by --early-stop-margin for P evaluations in a row; best.pt holds the peak. 0: off; with 5, no "
                   "run of the study would have lost more than 1 point of its peak")
    g.add_argument("--early-stop-margin", type=float, default=0.5, metavar="POINTS",
                   help="a kNN gain smaller than this (in points) counts as none: evaluation noise")
    g.add_argument("--lower-reg", type=float, default=0.0, metavar="FACTOR", help="multiply the --vicreg and --sigreg "
                   "weights by FACTOR at each evaluation where kNN lies --lower-reg-drop points below its best while "
                   "the prediction loss is under --lower-reg-loss of its step-1 value (the predictor has it easy, yet "
                   "the features got worse: the regulariser is steering them). 0: off")
    g.add_argument("--lower-reg-drop", type=float, default=2.0, metavar="POINTS",
                   help="kNN points below its best that count as a fall (~2 standard errors on 2,000 queries)")
    g.add_argument("--lower-reg-loss", type=float, default=0.4, metavar="FRACTION",
                   help="the prediction loss, as a fraction of its step-1 value, under which it counts as very low")
    g = p.add_argument_group("departures from the paper, off in the imagenet preset (on in 'small')")
    g.add_argument("--invariance", type=float, metavar="W", help="weight of C-JEPA's invariance term: 1 - cos "
                   "between the pooled context and the target's pooled second view (crop + flip)")
    g.add_argument("--view-size", type=int, metavar="PX", help="side of the second view (default --img-size)")
    g.add_argument("--target-layers", type=int, metavar="K",
                   help="targets are the mean of the target's last K blocks, each layer-normalised (data2vec)")
    g.add_argument("--rgb-aux", type=float, metavar="W",
                   help="weight of a pixel loss: a linear head on the predictions regresses the target patches' "
                        "normalised pixels (MAE)")
    g = p.add_argument_group("system")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="autocast precision (default: bfloat16 where the hardware has it, else float32 on CPU)")
    g.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    g.add_argument("--compile", action="store_true", help="torch.compile encoder and predictor (dynamic shapes)")
    g.add_argument("--deterministic", action="store_true", help="bit-for-bit repeatable on a GPU, resume included: "
                   "PyTorch's deterministic kernels (attention and convolution backward without atomic adds) and "
                   "a fixed cuBLAS workspace; ~38%% slower on a ViT-L/16 step (H200). CPU runs repeat without it")
    g.add_argument("--workers", type=int, help="DataLoader processes (JPEG decoding needs several per GPU)")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order, crops and masks")
    g.add_argument("--out", default="runs/demo", help="directory for latest.pt and log.csv")
    g.add_argument("--resume", action="store_true", help="continue from OUT/latest.pt (an error if there is none)")
    g.add_argument("--auto-resume", action="store_true", help="continue from OUT/latest.pt if it exists, else start: "
                   "the one command line a scheduler or torchrun --max-restarts can re-run")
    g.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    g.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    g.add_argument("--knn-every", type=int, default=0, help="steps between kNN evaluations (0: only at the end)")
    return p


def get_args(argv=None):
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # which preset fills the defaults
    first.add_argument("--data", default="demo")
    first.add_argument("--preset")
    first.add_argument("--epochs")
    known, _ = first.parse_known_args(argv)
    preset = known.preset if known.preset in PRESETS else "demo" if known.data == "demo" else "imagenet"
    p = make_parser(preset)
    p.set_defaults(**PRESETS[preset], data="demo", preset=preset)
    if known.epochs is not None:
        p.set_defaults(steps=None)  # an explicit --epochs beats a preset's step count
    return check_args(p.parse_args(argv))


def check_args(args):
    """Flag combinations that cannot train fail here, in one line naming the flag."""
    if args.model not in models.VIT_CONFIGS:
        raise SystemExit(f"error: unknown --model {args.model}: choose from {', '.join(models.VIT_CONFIGS)}")
    for flag in ("depth", "img_size", "patch_size", "pred_depth", "pred_dim", "batch_size", "epochs", "steps",
                 "num_targets", "save_every", "log_every", "view_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    for flag in ("lr", "start_lr", "final_lr", "warmup", "wd", "final_wd", "vicreg", "invariance", "rgb_aux",
                 "min_keep", "knn_every", "workers", "seed", "sigreg", "latent_weight", "projector", "early_stop",
                 "early_stop_margin", "lower_reg", "lower_reg_drop", "lower_reg_loss"):
        if getattr(args, flag) < 0:
            raise SystemExit(f"error: --{flag.replace('_', '-')} {getattr(args, flag)} must not be negative")
    if not all(0 <= m <= 1 for m in args.ema):
        raise SystemExit(f"error: --ema {args.ema[0]} {args.ema[1]}: momenta must lie in [0, 1]")
    heads = models.vit_config(args.model, args.depth)["num_heads"]
    if args.pred_dim % heads or args.pred_dim % 4:  # attention splits it by heads; the sin-cos table needs 4 | d
        raise SystemExit(f"error: --pred-dim {args.pred_dim} must be divisible by 4 and by --model {args.model}'s "
                         f"{heads} heads (the predictor has as many heads as the encoder)")
    if args.latent_weight == 0 and args.rgb_aux == 0:
        raise SystemExit("error: --latent-weight 0 needs --rgb-aux W > 0, or nothing is trained")
    if args.vicreg > 0 and args.batch_size < 2:
        raise SystemExit(f"error: --vicreg {args.vicreg} needs --batch-size 2 or more (a variance over the batch)")
    if (args.early_stop or args.lower_reg) and not args.knn_every:
        raise SystemExit("error: --early-stop and --lower-reg act on kNN: give --knn-every N too")
    if args.lower_reg and not (args.vicreg or args.sigreg):
        raise SystemExit(f"error: --lower-reg {args.lower_reg} lowers --vicreg or --sigreg: neither is on")
    if args.lower_reg >= 1:
        raise SystemExit(f"error: --lower-reg {args.lower_reg} must be below 1: the factor that lowers the weights")
    if args.projector and not args.sigreg:
        raise SystemExit(f"error: --projector {args.projector} needs --sigreg W > 0 (the projector feeds SIGReg)")
    if args.teacher and args.target != "frozen":
        raise SystemExit("error: --teacher needs --target frozen (the teacher is the frozen target)")
    if args.resume and args.auto_resume:
        raise SystemExit("error: give --resume or --auto-resume, not both")
    if (args.device or "").startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}, but torch sees no CUDA device")
    if args.img_size % args.patch_size:
        raise SystemExit(f"error: --img-size {args.img_size} is not divisible by --patch-size {args.patch_size}")
    if args.view_size and args.view_size % args.patch_size:
        raise SystemExit(f"error: --view-size {args.view_size} is not divisible by --patch-size {args.patch_size}")
    depth = models.vit_config(args.model, args.depth)["depth"]
    if not 1 <= args.target_layers <= depth:
        raise SystemExit(f"error: --target-layers {args.target_layers} must be between 1 and the encoder depth {depth}")
    if args.target == "frozen" and args.teacher is None and not args.resume:
        print("note: --target frozen without --teacher: the target is the random-init encoder")
    return args


# -------------------------------------------------------------------------------------------- schedules

def lr_at(step, total, warmup, args):
    """Linear warm-up from start_lr to lr, then cosine to final_lr (official WarmupCosineSchedule)."""
    if step < warmup:
        return args.start_lr + (args.lr - args.start_lr) * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return args.final_lr + (args.lr - args.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def wd_at(step, total, args):
    """Cosine ramp of weight decay from wd to final_wd (official CosineWDSchedule)."""
    return args.final_wd + (args.wd - args.final_wd) * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def mask_settings(args):
    """The keyword arguments of masks.sample_masks that the mask flags set."""
    return dict(num_targets=args.num_targets, target_scale=tuple(args.target_scale), min_keep=args.min_keep,
                target_aspect=tuple(args.target_aspect), context_scale=tuple(args.context_scale), context=args.context)


def mask_generator(seed, step):
    """Masks are a function of (seed, step): every rank draws the global batch's and keeps its slice."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ------------------------------------------------------------------------------------------ the step

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


def ijepa_loss(nets, imgs, masks_ctx, masks_tgt, args, view=None, step=0, reg_scale=1.0):
    """The I-JEPA objective on one batch (paper Sec. 3) -> (loss, the target encoder's output (B, N, D), each
    term unweighted, for the log: pred, and sigreg / vicreg / inv / rgb when on).
    imgs (B, 3, H, W), masks_ctx (B, Kc), masks_tgt (B, M, Kt); view (B, 3, h, w) with --invariance only.
    reg_scale: what --lower-reg has left of the --sigreg and --vicreg weights (1 until it acts)."""
    with torch.set_grad_enabled(args.target == "shared"):  # stop-gradient: the target branch builds no graph
        feats, h = target_features(nets.target, imgs, args.target_layers, args.target_norm)  # (B, N, D) each
        targets = apply_masks(h, masks_tgt)  # (B, M, Kt, D)
    z = nets.encoder(imgs, masks_ctx)  # (B, Kc, D): the context encoder sees the context patches only
    preds = nets.predictor(z, masks_ctx, masks_tgt)  # (B, M, Kt, D)
    compared = (preds, targets)
    if nets.projector is not None and args.target == "shared":  # LeWorldModel: compared in the projected space,
        compared = nets.projector(torch.cat([preds, targets]).flatten(0, 2)).chunk(2)  # one BatchNorm batch
    terms = {"pred": jepa_loss(*compared, args.loss, stop_gradient=args.target != "shared")}
    loss = args.latent_weight * terms["pred"]
    if args.sigreg > 0:  # LeJEPA: the pooled context (or its projection) tested against N(0, I), random directions
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step + 7)  # same directions on every rank
        pooled = z.mean(dim=1) if nets.projector is None else nets.projector(z.mean(dim=1))
        terms["sigreg"] = sigreg(pooled, generator=gen)
        loss = loss + reg_scale * args.sigreg * terms["sigreg"]
    if args.vicreg > 0:  # C-JEPA: variance and covariance of the pooled context keep it from shrinking
        terms["vicreg"] = sum(vicreg_loss(z.mean(dim=1)))
        loss = loss + reg_scale * args.vicreg * terms["vicreg"]
    if view is not None:  # C-JEPA's invariance: the pooled context points where the target's pooled view points
        with torch.no_grad():
            pooled_view = nets.target(view).mean(dim=1)  # (B, D)
        terms["inv"] = jepa_loss(z.mean(dim=1), pooled_view, "cosine")
        loss = loss + args.invariance * terms["inv"]
    if nets.rgb_head is not None:  # a pixel anchor: each prediction also regresses its patch's pixels
        pixels = apply_masks(pixel_targets(imgs, args.patch_size), masks_tgt)  # (B, M, Kt, 3 p p)
        terms["rgb"] = F.mse_loss(nets.rgb_head(preds), pixels)
        loss = loss + args.rgb_aux * terms["rgb"]
    return loss, feats, terms


def train_step(nets, optimizer, scaler, autocast, imgs, masks_ctx, masks_tgt, momentum, args, view=None, step=0,
               reg_scale=1.0):
    """One step: the loss, backward into context encoder and predictor, AdamW, then the EMA of the
    target. Returns (loss, target features (B, N, D) for the monitor, the loss terms, 1.0 if the step was
    skipped for a non-finite loss, else 0.0), all tensors: nothing here waits for a GPU. bench.py times it."""
    with autocast:
        loss, feats, terms = ijepa_loss(nets, imgs, masks_ctx, masks_tgt, args, view, step, reg_scale)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    # A non-finite loss never reaches the weights, checked on the device, not by the host waiting for the loss
    # every step: fused AdamW skips its whole update where found_inf is set (float16's GradScaler sets it itself)
    skipped = (~torch.isfinite(loss.detach())).float()
    if dist.is_available() and dist.is_initialized():  # one rank's bad loss spoils the shared gradients: all skip
        dist.all_reduce(skipped, op=dist.ReduceOp.MAX)
    if not scaler.is_enabled():
        optimizer.found_inf = skipped
    scaler.step(optimizer)
    scaler.update()
    optimizer.__dict__.pop("found_inf", None)
    if args.target == "ema":  # the target is never trained: it follows the context encoder (ema.py)
        ema_update(nets.target, nets.online, momentum)
    return loss.detach(), feats.detach(), {k: v.detach() for k, v in terms.items()}, skipped


def model_config(args):
    """Constructor arguments of encoder and predictor; stored in checkpoints so they rebuild themselves.
    The predictor has as many heads as the encoder, as in the official init_model."""
    vit = models.vit_config(args.model, args.depth)
    grid = args.img_size // args.patch_size
    return {"encoder": dict(img_size=args.img_size, patch_size=args.patch_size, **vit),
            "predictor": dict(num_patches=grid * grid, embed_dim=vit["embed_dim"], predictor_embed_dim=args.pred_dim,
                              depth=args.pred_depth, num_heads=vit["num_heads"])}


def build(args, device):
    """The networks and their optimizer: context encoder and predictor (and the --rgb-aux head) are
    trained; the target is a frozen copy that never enters the optimizer (ema.py says why)."""
    config = model_config(args)
    encoder = models.VisionTransformer(**config["encoder"]).to(device)
    predictor = models.VisionTransformerPredictor(**config["predictor"]).to(device)
    target = encoder if args.target == "shared" else make_target(encoder)
    if args.teacher:
        try:  # load_state_dict checks every name and shape
            target.load_state_dict(load_encoder(args.teacher).state_dict())
        except RuntimeError:
            raise SystemExit(f"error: --teacher {args.teacher} has another architecture than --model {args.model}"
                             f" --depth {args.depth} at --img-size {args.img_size} / --patch-size {args.patch_size}"
                             ) from None
    # Off as the paper, whose claim is that latent targets suffice; on small data they alone let the
    # features trade the colour and layout that kNN reads for shape after ~4,000 steps (EXPERIMENTS.md).
    rgb_head = torch.nn.Linear(encoder.embed_dim, 3 * args.patch_size**2).to(device) if args.rgb_aux > 0 else None
    # online / raw_*: the unwrapped modules (what EMA reads and checkpoints store) once DDP wraps the others
    projector = models.Projector(encoder.embed_dim, args.projector).to(device) if args.projector else None
    nets = SimpleNamespace(encoder=encoder, predictor=predictor, target=target, rgb_head=rgb_head, online=encoder,
                           raw_predictor=predictor, raw_rgb_head=rgb_head, projector=projector, raw_projector=projector)
    params = [p for m in (encoder, predictor, rgb_head, projector) if m is not None for p in m.parameters()]
    optimizer = make_optimizer(params, args.start_lr, args.wd)
    if args.target != "shared":  # the two properties that keep I-JEPA from collapsing
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert not any(id(p) in in_optimizer for p in target.parameters()), "target parameter in the optimizer"
        assert not any(p.requires_grad for p in target.parameters()), "target parameter requires grad"
    return nets, optimizer, config


def make_optimizer(params, lr, wd):
    """AdamW; biases and 1-D parameters (LayerNorm) get no weight decay, as official. fused=True runs the
    whole update as one kernel instead of a dozen per-tensor ops (~4% of a CPU step, EXPERIMENTS.md)."""
    decay, no_decay = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, weight_decay=wd,
                             fused=True)


def autocast_dtype(device, requested=None, log=print):
    """The --dtype asked for, else bfloat16 where the hardware computes it: CUDA GPUs since Ampere; CPUs with
    AVX-512 BF16 (AMD EPYC) or AMX (Intel Xeon, whose oneDNN runs bf16 matmuls on AMX tiles). Elsewhere bf16
    is emulated (an AVX2-only CPU ran a bf16 matmul ~60x slower than float32), so such CPUs get float32, and
    pre-Ampere GPUs float16 with GradScaler."""
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


# -------------------------------------------------------------------- setting up, monitoring, the end

def deterministic_mode():
    """--deterministic, before any CUDA work (cuBLAS reads its workspace setting when it starts): kernels that add
    in a fixed order (attention backward without split keys, cuDNN without atomics); one with none raises."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def setup_processes(args):
    """Device, processes and precision -> (ddp, device, rank, world, log, dtype). torchrun sets RANK; a plain
    run never touches torch.distributed. Only rank 0 prints."""
    ddp = "RANK" in os.environ
    if args.deterministic:
        deterministic_mode()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    log = print if rank == 0 else (lambda *a, **k: None)
    dtype = autocast_dtype(device, args.dtype, log)
    args.dtype = str(dtype).removeprefix("torch.")
    return ddp, device, rank, world, log, dtype


def setup_data(args, world):
    """-> (training set, kNN bank, kNN queries, steps per epoch, total steps, warm-up steps). Bad mask flags
    fail here, in one line, not at step 1000."""
    train_set, bank_set, query_set = data.make_datasets(args.data, args.img_size, args.seed, args.val_data)
    if args.knn_every and bank_set is None:
        raise SystemExit(f"error: --knn-every needs validation images: {args.data}/val or --val-data")
    steps_per_epoch = len(train_set) // (args.batch_size * world)
    total = args.steps or args.epochs * steps_per_epoch
    try:
        sample_masks(args.batch_size * world, args.img_size // args.patch_size,
                     generator=mask_generator(args.seed, 0), **mask_settings(args))
    except ValueError as e:
        raise SystemExit(f"error: mask flags (--target-scale/--context-scale/--min-keep...): {e}") from None
    return train_set, bank_set, query_set, steps_per_epoch, total, min(int(args.warmup * steps_per_epoch), total // 2)


def resume(path, nets, optimizer, scaler, config, args):
    """OUT/latest.pt into the freshly built run (checkpoint.py) -> (step to continue from, the monitor's
    step-0 yardstick, the rule's state): the monitor, best.pt and the rule carry on where they were."""
    ckpt = checkpoint.restore(path, trained_modules(nets, args.target != "shared"), optimizer, scaler, config)
    return ckpt["step"], ckpt.get("monitor_reference"), {k: ckpt.get(k, v) for k, v in RULE_START.items()}


def trained_modules(nets, with_target=True):
    """The modules a checkpoint holds, unwrapped, under the official names (the target too: it is what the
    paper evaluates; a shared target is the encoder itself, so resuming skips it)."""
    return {"encoder": nets.online, "predictor": nets.raw_predictor,
            **({"target_encoder": nets.target} if with_target else {}),
            **({"rgb_head": nets.raw_rgb_head} if nets.rgb_head is not None else {}),
            **({"projector": nets.raw_projector} if nets.projector is not None else {})}


def wrap(nets, args, device, ddp):
    """DDP around the trained modules only (the EMA target never is), then torch.compile if asked."""
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        nets.encoder, nets.predictor = (torch.nn.parallel.DistributedDataParallel(m, device_ids=ids)
                                        for m in (nets.encoder, nets.predictor))
        for name in ("rgb_head", "projector"):  # trained too: unwrapped, their gradients would differ between ranks
            if getattr(nets, name) is not None:  # (the projector's BatchNorm keeps per-rank statistics, as LeJEPA's)
                setattr(nets, name, torch.nn.parallel.DistributedDataParallel(getattr(nets, name), device_ids=ids))
    if args.compile:
        nets.encoder, nets.predictor = (torch.compile(m, dynamic=True) for m in (nets.encoder, nets.predictor))


def end_processes(nets, ddp):
    """Unwrap DDP, then end the process group. A DDP wrapper still alive when the group ends made ~1 process in 4
    abort at exit (torch 2.13, gloo: "terminate called without an active exception"), failing a finished run."""
    if ddp:
        nets.encoder, nets.predictor = nets.online, nets.raw_predictor
        nets.rgb_head, nets.projector = nets.raw_rgb_head, nets.raw_projector
        gc.collect()  # the wrappers sit in reference cycles: free them before the group goes
        dist.destroy_process_group()


# loss_*: each term of the loss unweighted (its weight is the flag of the same name), so a reader sees which
# one drives training; token_share: how alike one image's target tokens are (1: all the same token)
# weight_*: the regulariser weights in force (--lower-reg lowers them)
LOG_COLUMNS = ["step", "epoch", "loss", "lr", "wd", "momentum", "img_per_s", "std_mean", "std_min", "eff_rank",
               "sigreg", "knn_top1", "token_share", "loss_pred", "loss_sigreg", "loss_vicreg", "loss_inv", "loss_rgb",
               "weight_vicreg", "weight_sigreg"]


def monitor(feats, row, reference, device, log, csv_file, args):
    """The collapse monitor on the target's pooled features (losses.py), then the log line, the CSV row and
    the warning -> (stats, the step-0 yardstick, whether it warned). row: LOG_COLUMNS up to img_per_s, total,
    step_s (seconds a step, or None while timing) and knn_top1 when it was measured."""
    pooled = feats.mean(dim=1)  # (B, D)
    stats = {**collapse_stats(pooled), "token_share": token_share(feats), "loss_pred": row.get("loss_pred")}
    # a label-free collapse signal: SIGReg of the pooled target features along fixed directions
    stats["sigreg"] = sigreg(pooled, generator=torch.Generator().manual_seed(args.seed)).item()
    reference, knn, step_s = reference or stats, row.get("knn_top1"), row["step_s"]
    speed = (f"{row['img_per_s']:.0f} img/s ETA {(row['total'] - row['step']) * step_s / 60:.1f} min" if step_s
             else "timing...")
    log(f"step {row['step']}/{row['total']} ep {row['epoch']} loss {row['loss']:.4f} lr {row['lr']:.2e} "
        f"wd {row['wd']:.3f} mom {row['momentum']:.4f} | {speed} mem {peak_mem_mb(device):.0f}MB | "
        f"std {stats['std_mean']:.3f} (min {stats['std_min']:.3f}) rank {stats['eff_rank']:.1f} "
        f"sigreg {stats['sigreg']:.1f} tokens {stats['token_share']:.2f}" + (f" | kNN {knn:.1f}%" if knn is not None
                                                                             else ""), flush=True)
    if csv_file is not None:
        csv.writer(csv_file).writerow([{**row, **stats}.get(c, "") for c in LOG_COLUMNS])
        csv_file.flush()
    warned = row["step"] > 1 and collapse_suspected(stats, reference)  # step 1 is the yardstick
    if warned:
        log(f"warning: representation collapse suspected at step {row['step']}: std {stats['std_mean']:.4f} "
            f"(start {reference['std_mean']:.4f}), eff_rank {stats['eff_rank']:.2f} "
            f"(start {reference['eff_rank']:.2f})")
        if args.stop_on_collapse:
            raise SystemExit(f"error: stopped on collapse at step {row['step']} (--stop-on-collapse)")
    return stats, reference, warned


# The rule's state, saved in every checkpoint: best.pt's record, evaluations since kNN last gained, the weight scale
RULE_START = dict(best_step=0, best_knn=-1.0, stale_evals=0, reg_scale=1.0)


def act_on_monitor(rule, step, knn, pred_ratio, args):
    """The seed's fourth rule, "adjust loss weights or stop when collapse is detected", at one kNN evaluation ->
    (log lines saying what it did and why, whether to stop); `rule` (RULE_START's keys) is updated in place.
    Lower (C-JEPA's advice): kNN fell --lower-reg-drop points below its best while the prediction loss is very
    low (pred_ratio: the loss over its step-1 value); the VICReg and SIGReg weights are multiplied by
    --lower-reg, again at each evaluation while that lasts. Stop: kNN has not beaten its best by a margin
    for --early-stop evaluations in a row. Rank 0 decides (kNN is measured there); the loop shares it."""
    said, best = [], rule["best_knn"]
    if args.lower_reg and knn <= best - args.lower_reg_drop and pred_ratio < args.lower_reg_loss:
        rule["reg_scale"] *= args.lower_reg
        said.append(f"rule: kNN {knn:.1f}% is {best - knn:.1f} points below its best {best:.1f}% (step "
                    f"{rule['best_step']}) while the prediction loss is {pred_ratio:.2f} of its step-1 value: "
                    f"--vicreg {args.vicreg * rule['reg_scale']:.3g}, --sigreg {args.sigreg * rule['reg_scale']:.3g} "
                    f"from step {step + 1} (--lower-reg {args.lower_reg})")
    rule["stale_evals"] = 0 if knn > best + args.early_stop_margin else rule["stale_evals"] + 1
    if knn > best:
        rule["best_step"], rule["best_knn"] = step, knn
    stop = bool(args.early_stop) and rule["stale_evals"] >= args.early_stop
    if stop:
        said.append(f"rule: kNN has not beaten {rule['best_knn']:.1f}% by {args.early_stop_margin} points for "
                    f"{args.early_stop} evaluations: stopping early at step {step} (--early-stop); best.pt holds step "
                    f"{rule['best_step']}")
    return said, stop


def stop_if_skipped(skipped, checked, done, ckpt_path):
    """Where the loop waits for the device anyway, it reads the count of steps skipped for a non-finite loss: any
    ends the run there, before anything is saved -> `done`, the step checked up to."""
    if skipped.item():
        raise SystemExit(f"error: non-finite loss in steps {checked + 1}-{done} ({skipped.item():.0f} of them, their "
                         f"updates skipped); {ckpt_path} still holds the last good state")
    return done


def final_knn(evaluated, which, config, bank_set, query_set, args, device, dtype, log):
    """The end of a run: kNN of the trained encoder against a random-init encoder of the same shape."""
    torch.manual_seed(args.seed + 1)
    trained = knn_evaluate(evaluated, bank_set, query_set, device, dtype, args.workers)[0]
    random = knn_evaluate(models.VisionTransformer(**config["encoder"]).to(device), bank_set, query_set, device,
                          dtype, args.workers)[0]
    log(f"kNN top-1 on held-out images: trained {which} encoder {trained:.1f}%, random init {random:.1f}%")
    return dict(knn_top1=trained, knn_top1_random=random)


# ----------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = get_args(argv)
    # set up: processes and precision; data and the length of the run; networks; the state to go on from
    ddp, device, rank, world, log, dtype = setup_processes(args)
    master, B, grid, mask_kw = rank == 0, args.batch_size, (args.img_size // args.patch_size,) * 2, mask_settings(args)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    # bf16 has float32's exponent range, so gradients cannot underflow: no GradScaler (the official code
    # uses one anyway); float16 does need one.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(args.seed)
    train_set, bank_set, query_set, steps_per_epoch, total, warmup = setup_data(args, world)
    nets, optimizer, config = build(args, device)
    ckpt_path, log_path = checkpoint.claim_run(args.out, args), os.path.join(args.out, "log.csv")
    start, reference, rule = 0, None, dict(RULE_START)  # rule: best.pt's (step, kNN) and act_on_monitor's state
    if args.resume:
        start, reference, rule = resume(ckpt_path, nets, optimizer, scaler, config, args)
        log(f"resumed from {ckpt_path} at step {start}")
    wrap(nets, args, device, ddp)
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=data.StepBatches(len(train_set), B, rank, world, args.seed, start, total),
        num_workers=args.workers, pin_memory=device.type == "cuda")
    log(f"I-JEPA: {args.model}/{args.patch_size} at {args.img_size}px ({grid[0]}x{grid[1]} patches), "
        f"{sum(p.numel() for g in optimizer.param_groups for p in g['params']) / 1e6:.1f}M trained params, "
        f"{len(train_set)} images{' (decoded once, in memory)' if getattr(train_set, 'images', None) else ''}, "
        f"{world} process(es) x batch {B}, {total} steps, {args.dtype} on {device}, target={args.target}")

    # the loop: schedules, masks, one step, then the monitor, kNN, log and checkpoint
    csv_file = checkpoint.open_log(log_path, LOG_COLUMNS, start if args.resume else None) if master else None
    loss_value, stats, timed_steps, timed_s, warnings, stop = float("nan"), {}, 0, 0.0, 0, False
    skipped, checked = torch.zeros((), device=device), start  # steps skipped for a non-finite loss since `checked`
    t_last, step, t_start = time.perf_counter(), start, time.perf_counter()
    asked, previous_handlers = checkpoint.catch_stop_signals()
    # kNN reads the target encoder, as the paper; a frozen target learns nothing, so there it reads the student
    which, probed = ("context", nets.online) if args.target == "frozen" else ("target", nets.target)
    for step, (imgs, _) in enumerate(loader, start=start):
        lr, wd, m = lr_at(step, total, warmup, args), wd_at(step, total, args), momentum_at(step, total, *args.ema)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.param_groups[0]["weight_decay"] = wd
        imgs = imgs.to(device, non_blocking=True)
        gen, rows = mask_generator(args.seed, step), slice(rank * B, (rank + 1) * B)
        masks_ctx, masks_tgt = (mk[rows].to(device) for mk in sample_masks(B * world, grid, generator=gen, **mask_kw))
        view = None
        if args.invariance > 0:  # 9 draws per image (5 used): the layout of earlier runs, which reproduce exactly
            view = data.random_view(imgs, torch.rand(B * world, 9, generator=gen)[rows].to(device), args.view_size)
        loss, feats, terms, bad = train_step(nets, optimizer, scaler, autocast, imgs, masks_ctx, masks_tgt, m, args,
                                             view, step, rule["reg_scale"])
        skipped += bad  # on the device: read only where the loop waits anyway (log lines, saves)

        done = step + 1
        if step - start >= 3:  # steady-state throughput: the first steps pay for warm-up and allocation
            timed_steps, timed_s = timed_steps + 1, timed_s + time.perf_counter() - t_last
        knn_due = bool(args.knn_every) and done % args.knn_every == 0  # the same on every rank
        knn = knn_evaluate(probed, bank_set, query_set, device, dtype, args.workers) if knn_due and master else None
        if done % args.log_every == 0 or done == total or step == 0 or knn_due:  # step 0: the monitor's yardstick
            checked, loss_value = stop_if_skipped(skipped, checked, done, ckpt_path), loss.item()
            step_s = timed_s / timed_steps if timed_steps else None
            row = dict(step=done, total=total, epoch=step // steps_per_epoch, loss=loss_value, lr=lr, wd=wd,
                       momentum=m, img_per_s=B * world / step_s if step_s else float("nan"), step_s=step_s,
                       **({"knn_top1": knn[0]} if knn else {}), **{f"loss_{k}": v.item() for k, v in terms.items()},
                       weight_vicreg=args.vicreg * rule["reg_scale"], weight_sigreg=args.sigreg * rule["reg_scale"])
            stats, reference, warned = monitor(feats, row, reference, device, log, csv_file, args)
            warnings += warned
        stop, early = checkpoint.stop_requested(asked, device), False
        new_best = bool(knn) and knn[0] > rule["best_knn"]  # best.pt holds the kNN peak
        if knn:  # rank 0: best.pt's record, and the rule's actions where asked
            pred_ratio = terms["pred"].item() / (reference.get("loss_pred") or math.nan)  # nan: unknown, never low
            said, early = act_on_monitor(rule, done, knn[0], pred_ratio, args)
            for line in said:
                log(line, flush=True)
        if knn_due and ddp:  # kNN is measured on rank 0: every rank takes its decisions
            shared = torch.tensor([rule["reg_scale"], float(early)], dtype=torch.float64, device=device)
            dist.broadcast(shared, 0)
            rule["reg_scale"], early = shared[0].item(), bool(shared[1].item())
        if done % args.save_every == 0 or done == total or stop or new_best or early:  # on every rank but new_best,
            checked = stop_if_skipped(skipped, checked, done, ckpt_path)  # which falls on a log line, checked there
            if master:
                checkpoint.save_run(args.out, checkpoint.checkpoint_state(
                    trained_modules(nets), optimizer, scaler, done, config=config, epoch=done // steps_per_epoch,
                    args=vars(args), monitor_reference=reference, **rule), new_best)
        if early:
            break
        if stop:
            log(f"stopped by a signal after step {done}/{total}: {ckpt_path} holds it; the same command with "
                f"--auto-resume (or --resume) continues exactly", flush=True)
            break
        t_last = time.perf_counter()  # the next interval is data + step only, not kNN, logging or saving

    # the end: the summary, and kNN of the trained encoder against a random-init one
    checkpoint.restore_signals(previous_handlers)
    if stop:
        end_processes(nets, ddp)
        raise SystemExit(checkpoint.STOPPED_BY_SIGNAL)
    summary = dict(steps=step + 1 - start if total > start else 0, loss=loss_value,
                   img_per_s=B * world * timed_steps / max(timed_s, 1e-9), **{k: stats.get(k, math.nan) for k in
                   ("std_mean", "eff_rank", "sigreg")}, peak_mem_mb=peak_mem_mb(device), collapse_warnings=warnings,
                   train_s=time.perf_counter() - t_start, **(dict(best_step=rule["best_step"], best_knn=rule[
                       "best_knn"]) if args.knn_every else {}), **(dict(stopped_early_at=done, steps_saved=total - done)
                                                                   if early else {}))
    if bank_set is not None and master:
        summary.update(final_knn(probed, which, config, bank_set, query_set, args, device, dtype, log))
    log("summary: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    end_processes(nets, ddp)
    return summary


if __name__ == "__main__":
    main()
