"""The recipes and the flags of train.py: the presets (the official ImageNet recipe, the demo, small data),
every flag with why its default was chosen, the checks that refuse a combination that cannot train, and what
the flags set in masks.py and in the I-JEPA loss.

    args = get_args(["--preset", "small", "--data", "./cifar10"])   # an argparse namespace, checked

The official code keeps its recipes apart from its loop too, in YAML files read through args['section']['key'];
here they are Python dicts, and every flag is an argparse flag with its help.
"""
import argparse

import torch

import models

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
    g.add_argument("--init", metavar="PATH", help="start from pretrained weights: our checkpoint, an official "
                   ".pth.tar, a transformers IJepaModel folder or a timm vit_*_gap file; both encoders from it (the "
                   "predictor too where it has one); step 0, fresh optimizer and schedules, a new --out")
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
                   help="autocast precision (default: bfloat16 on GPUs since Ampere; on a CPU the faster of bfloat16 "
                        "and float32, measured at start-up; a resumed run keeps the one it started with)")
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
    g.add_argument("--knn-every", type=int, default=0, help="steps between kNN evaluations (0: only at the end), "
                   "each with the label-free statistics (LiDAR, RankMe, alpha-ReQ) of fixed training images")
    g.add_argument("--probe", action="store_true", help="with --knn-every: the linear probe too, on the same "
                   "features (seconds for ~10k images: a full-batch fit, not for ImageNet)")
    g.add_argument("--stop-at", type=int, metavar="STEP", help="stop after this step as a signal would (saved; the "
                   "same command with --auto-resume goes on): a run cut short on purpose, e.g. to replay its start")
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
                 "num_targets", "save_every", "log_every", "view_size", "stop_at"):
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
    if (args.early_stop or args.lower_reg or args.probe) and not args.knn_every:
        raise SystemExit("error: --early-stop, --lower-reg and --probe act at kNN's evaluations: give --knn-every N")
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


# ------------------------------------------------------------------------------ what the flags set elsewhere

def mask_settings(args):
    """The keyword arguments of masks.sample_masks that the mask flags set."""
    return dict(num_targets=args.num_targets, target_scale=tuple(args.target_scale), min_keep=args.min_keep,
                target_aspect=tuple(args.target_aspect), context_scale=tuple(args.context_scale), context=args.context)


def monitor_settings(args):
    """The keyword arguments of monitor.Monitor that the flags of the fourth rule set."""
    return dict(stop_on_collapse=args.stop_on_collapse, early_stop=args.early_stop, seed=args.seed,
                early_stop_margin=args.early_stop_margin, lower_reg=args.lower_reg,
                lower_reg_drop=args.lower_reg_drop, lower_reg_loss=args.lower_reg_loss)


def loss_settings(args, reg_scale=1.0):
    """The keyword arguments of train.ijepa_loss that the loss flags set; reg_scale: what --lower-reg has left of
    the --vicreg and --sigreg weights (1 until the monitor lowers them)."""
    return dict(kind=args.loss, target_layers=args.target_layers, target_norm=args.target_norm,
                stop_gradient=args.target != "shared", latent_weight=args.latent_weight,
                sigreg_weight=reg_scale * args.sigreg, vicreg_weight=reg_scale * args.vicreg,
                invariance=args.invariance, rgb_aux=args.rgb_aux)
