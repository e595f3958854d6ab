"""I-JEPA pre-training: one loop for one CPU, one GPU, or many GPUs and nodes through torchrun.

    python train.py                              # the demo: built-in data, trains and evaluates in minutes on a CPU
    python train.py --data ./imagenet            # the official ImageNet recipe (README lists what differs)
    torchrun --nproc_per_node=8 train.py --data ./imagenet

It reads in the order a step happens, then a run: the I-JEPA step (paper Sec. 3: the target encoder embeds the
whole image without gradients, the context encoder the context patches, the predictor predicts the target features,
the loss trains context encoder and predictor, the target follows by EMA); the schedules, pure functions of the
step; the networks; setting up; the log; then main: set up, the loop, the end. Elsewhere: the presets and flags
(config.py), the device and precision (machine.py), watching the features and acting on them (monitor.py), restart
safety (checkpoint.py), the images (data.py).
"""
import csv
import gc
import math
import os
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import config
import data
import models
from ema import ema_update, make_target, momentum_at
from eval_knn import knn_against_random_init, knn_evaluate
from export import load_into
from losses import jepa_loss, pixel_targets, sigreg, vicreg_loss
from machine import facts, peak_mem_mb, setup_precision, setup_processes, step_unless
from masks import apply_masks, sample_masks
from monitor import Monitor, label_free_inputs, label_free_stats

# ------------------------------------------------------------------------------------------------ the step


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


def ijepa_loss(encoder, predictor, target, imgs, masks_ctx, masks_tgt, *, kind="smooth_l1", target_layers=1,
               target_norm="layernorm", stop_gradient=True, latent_weight=1.0, projector=None, sigreg_weight=0.0,
               sigreg_generator=None, vicreg_weight=0.0, view=None, invariance=0.0, rgb_head=None, rgb_aux=0.0):
    """The I-JEPA objective on one batch (paper Sec. 3) -> (loss, the target encoder's output (B, N, D), each
    term unweighted, for the log: pred, and sigreg / vicreg / inv / rgb when on). imgs (B, 3, H, W), masks_ctx
    (B, Kc), masks_tgt (B, M, Kt). The defaults are the paper's; the keywords switch on what the study tests
    (config.loss_settings maps the flags to them): the weights of SIGReg (its directions drawn by
    sigreg_generator), VICReg, the invariance to `view` (B, 3, h, w) and the pixel loss of rgb_head."""
    with torch.set_grad_enabled(not stop_gradient):  # stop-gradient: the target branch builds no graph
        feats, h = target_features(target, imgs, target_layers, target_norm)  # (B, N, D) each
        targets = apply_masks(h, masks_tgt)  # (B, M, Kt, D)
    z = encoder(imgs, masks_ctx)  # (B, Kc, D): the context encoder sees the context patches only
    preds = predictor(z, masks_ctx, masks_tgt)  # (B, M, Kt, D)
    compared = (preds, targets)
    if projector is not None and not stop_gradient:  # LeWorldModel: compared in the projected space,
        compared = projector(torch.cat([preds, targets]).flatten(0, 2)).chunk(2)  # one BatchNorm batch
    terms = {"pred": jepa_loss(*compared, kind, stop_gradient=stop_gradient)}
    loss = latent_weight * terms["pred"]
    if sigreg_weight > 0:  # LeJEPA: the pooled context (or its projection) tested against N(0, I), random directions
        pooled = z.mean(dim=1) if projector is None else projector(z.mean(dim=1))
        terms["sigreg"] = sigreg(pooled, generator=sigreg_generator)
        loss = loss + sigreg_weight * terms["sigreg"]
    if vicreg_weight > 0:  # C-JEPA: variance and covariance of the pooled context keep it from shrinking
        terms["vicreg"] = sum(vicreg_loss(z.mean(dim=1)))
        loss = loss + vicreg_weight * terms["vicreg"]
    if view is not None:  # C-JEPA's invariance: the pooled context points where the target's pooled view points
        with torch.no_grad():
            pooled_view = target(view).mean(dim=1)  # (B, D)
        terms["inv"] = jepa_loss(z.mean(dim=1), pooled_view, "cosine")
        loss = loss + invariance * terms["inv"]
    if rgb_head is not None:  # a pixel anchor: each prediction also regresses its patch's pixels
        pixels = apply_masks(pixel_targets(imgs, target.patch_size), masks_tgt)  # (B, M, Kt, 3 p p)
        terms["rgb"] = F.mse_loss(rgb_head(preds), pixels)
        loss = loss + rgb_aux * terms["rgb"]
    return loss, feats, terms


def train_step(nets, optimizer, scaler, autocast, imgs, masks_ctx, masks_tgt, momentum=None, **loss_kw):
    """One step: the loss, backward into context encoder and predictor, the optimizer, then the EMA of the
    target (momentum None: a shared or frozen target, which never follows by EMA). Returns (loss, target
    features (B, N, D) for the monitor, the loss terms, 1.0 if the step was skipped for a non-finite loss, else
    0.0), all tensors: nothing here waits for a GPU. bench.py times it. loss_kw: ijepa_loss's keywords."""
    with autocast:
        loss, feats, terms = ijepa_loss(nets.encoder, nets.predictor, nets.target, imgs, masks_ctx, masks_tgt,
                                        projector=nets.projector, rgb_head=nets.rgb_head, **loss_kw)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    # A non-finite loss never reaches the weights, checked on the device, not by the host waiting for the loss
    skipped = (~torch.isfinite(loss.detach())).float()
    if dist.is_available() and dist.is_initialized():  # one rank's bad loss spoils the shared gradients: all skip
        dist.all_reduce(skipped, op=dist.ReduceOp.MAX)
    if scaler.is_enabled():  # float16: the scaler skips a step whose gradients are not finite itself
        scaler.step(optimizer)
        scaler.update()
    else:
        step_unless(optimizer, skipped)
    if momentum is not None:  # the target is never trained: it follows the context encoder (ema.py)
        ema_update(nets.target, nets.online, momentum)
    return loss.detach(), feats.detach(), {k: v.detach() for k, v in terms.items()}, skipped


# --------------------------------------------------------------------------------------------- schedules

def lr_at(step, total, warmup, args):
    """Linear warm-up from start_lr to lr, then cosine to final_lr (official WarmupCosineSchedule)."""
    if step < warmup:
        return args.start_lr + (args.lr - args.start_lr) * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return args.final_lr + (args.lr - args.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def wd_at(step, total, args):
    """Cosine ramp of weight decay from wd to final_wd (official CosineWDSchedule)."""
    return args.final_wd + (args.wd - args.final_wd) * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def set_schedules(optimizer, step, total, warmup, args):
    """The learning rate and weight decay of `step` into the optimizer -> (lr, wd, the EMA's momentum)."""
    lr, wd = lr_at(step, total, warmup, args), wd_at(step, total, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.param_groups[0]["weight_decay"] = wd  # group 1, biases and norms, never decays
    return lr, wd, momentum_at(step, total, *args.ema)


def mask_generator(seed, step):
    """Masks are a function of (seed, step): every rank draws the global batch's and keeps its slice."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def step_masks(args, step, rank, world, grid, imgs):
    """This rank's context and target masks (B, Kc), (B, M, Kt) for `step`, and C-JEPA's second view of imgs
    (B, 3, H, W) with --invariance (else None): slices of the global batch's, drawn from (seed, step)."""
    B = len(imgs)
    gen, rows = mask_generator(args.seed, step), slice(rank * B, (rank + 1) * B)
    masks = [m[rows].to(imgs.device) for m in sample_masks(B * world, grid, generator=gen,
                                                           **config.mask_settings(args))]
    view = None
    if args.invariance > 0:  # 9 draws per image (5 used): the layout of earlier runs, which reproduce exactly
        view = data.random_view(imgs, torch.rand(B * world, 9, generator=gen)[rows].to(imgs.device), args.view_size)
    return *masks, view


# ------------------------------------------------------------------------------------------ the networks

def model_config(args):
    """Constructor arguments of encoder and predictor; stored in checkpoints so they rebuild themselves.
    The predictor has as many heads as the encoder, as in the official init_model."""
    vit = models.vit_config(args.model, args.depth)
    grid = args.img_size // args.patch_size
    return {"encoder": dict(img_size=args.img_size, patch_size=args.patch_size, **vit),
            "predictor": dict(num_patches=grid * grid, embed_dim=vit["embed_dim"], predictor_embed_dim=args.pred_dim,
                              depth=args.pred_depth, num_heads=vit["num_heads"])}


def build(args, device, log=print):
    """The networks and their optimizer: context encoder and predictor (and the --rgb-aux head) are
    trained; the target is a frozen copy that never enters the optimizer (ema.py says why)."""
    config = model_config(args)
    encoder = models.VisionTransformer(**config["encoder"]).to(device)
    predictor = models.VisionTransformerPredictor(**config["predictor"]).to(device)
    target = encoder if args.target == "shared" else make_target(encoder)
    if args.init and not args.resume:  # pretrained weights in (a resumed run has its own), of any kind export reads
        log(load_into(args.init, config, "--init", context=encoder, target=target, predictor=predictor))
    if args.teacher:  # SALT's frozen target: the teacher's target encoder
        load_into(args.teacher, config, "--teacher", target=target)
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


# ------------------------------------------------------------------------------------------- setting up

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
                     generator=mask_generator(args.seed, 0), **config.mask_settings(args))
    except ValueError as e:
        raise SystemExit(f"error: mask flags (--target-scale/--context-scale/--min-keep...): {e}") from None
    return train_set, bank_set, query_set, steps_per_epoch, total, min(int(args.warmup * steps_per_epoch), total // 2)


def resume(path, nets, optimizer, scaler, model, monitor, args, log):
    """OUT/latest.pt into the freshly built run (checkpoint.py): the weights, the optimizer, the step, and the
    monitor's state (its yardstick, best.pt's record, the rule's), so all carry on as they were -> the step."""
    ckpt = checkpoint.restore(path, trained_modules(nets, args.target != "shared"), optimizer, scaler, model)
    monitor.load_state_dict(ckpt)
    log(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"]


def end_processes(nets, ddp):
    """Unwrap DDP, then end the process group. A DDP wrapper still alive when the group ends made ~1 process in 4
    abort at exit (torch 2.13, gloo: "terminate called without an active exception"), failing a finished run."""
    if ddp:
        nets.encoder, nets.predictor = nets.online, nets.raw_predictor
        nets.rgb_head, nets.projector = nets.raw_rgb_head, nets.raw_projector
        gc.collect()  # the wrappers sit in reference cycles: free them before the group goes
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ the log, the checks

# loss_*: each loss term unweighted (its weight: the flag of its name); token_share: how alike an image's target
# tokens are (1: all); weight_*: the weights in force (--lower-reg); lidar, rankme, alpha_req: monitor.py's
LOG_COLUMNS = ["step", "epoch", "loss", "lr", "wd", "momentum", "img_per_s", "std_mean", "std_min", "eff_rank",
               "sigreg", "knn_top1", "token_share", "loss_pred", "loss_sigreg", "loss_vicreg", "loss_inv", "loss_rgb",
               "weight_vicreg", "weight_sigreg", "lidar", "rankme", "alpha_req", "probe_top1"]


class RunLog:
    """What a run says, on rank 0: a line and a log.csv row (opened by `note`) at each log step; the throughput of
    data and step only, from the 4th step (the first pay for warm-up and allocation); the summary at the end."""

    def __init__(self, path, header, resumed_at, note, log, master, batch, total):
        self.csv = checkpoint.open_log(path, header, resumed_at, note) if master else None
        self.log, self.batch, self.total, self.header = log, batch, total, header
        self.steps, self.seconds, self.warnings, self.stats, self.loss = 0, 0.0, 0, {}, math.nan
        self.started = self.last = time.perf_counter()

    def timed(self, steps_since_start):
        """After each step; time from `restart` on counts once the run is 3 steps in."""
        if steps_since_start >= 3:
            self.steps, self.seconds = self.steps + 1, self.seconds + time.perf_counter() - self.last

    def restart(self):
        self.last = time.perf_counter()

    def line(self, row, feats, monitor, device):
        """The monitor's statistics of the target's output feats (B, N, D) at a log step, then the line, the CSV
        row and the alarm's warning -> the statistics. row: the log's columns known to the loop."""
        step_s = self.seconds / self.steps if self.steps else None
        row = dict(row, img_per_s=self.batch / step_s if step_s else math.nan)
        self.stats, self.loss = monitor.watch(feats, row["step"], row.get("loss_pred")), row["loss"]
        stats, knn = self.stats, row.get("knn_top1", math.nan)
        eta = f"{row['img_per_s']:.0f} img/s ETA {(self.total - row['step']) * step_s / 60:.1f} min" if step_s else ""
        self.log(f"step {row['step']}/{self.total} ep {row['epoch']} loss {row['loss']:.4f} lr {row['lr']:.2e} wd "
                 f"{row['wd']:.3f} mom {row['momentum']:.4f} | {eta or 'timing...'} mem {peak_mem_mb(device):.0f}MB"
                 f" | std {stats['std_mean']:.3f} (min {stats['std_min']:.3f}) rank {stats['eff_rank']:.1f} sigreg "
                 f"{stats['sigreg']:.1f} tokens {stats['token_share']:.2f}" + f" | kNN {knn:.1f}%" * (knn == knn),
                 flush=True)
        if self.csv is not None:
            csv.writer(self.csv).writerow([{**row, **stats}.get(c, "") for c in self.header])
            self.csv.flush()
        if stats["warning"]:
            self.warnings += 1
            self.log(stats["warning"])
        return stats

    def summary(self, steps, device, **more):
        """The run's summary line (returned as a dict): steps, last loss, throughput, the last statistics, memory."""
        summary = dict(steps=steps, loss=self.loss, img_per_s=self.batch * self.steps / max(self.seconds, 1e-9),
                       **{k: self.stats.get(k, math.nan) for k in ("std_mean", "eff_rank", "sigreg")},
                       peak_mem_mb=peak_mem_mb(device), collapse_warnings=self.warnings,
                       train_s=time.perf_counter() - self.started, **more)
        self.log("summary: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in summary.items()))
        return summary


def stop_if_skipped(skipped, checked, done, ckpt_path):
    """Where the loop waits anyway, the count of steps skipped for a non-finite loss: any ends the run there, before
    anything is saved -> `done`, the step checked up to."""
    if skipped.item():
        raise SystemExit(f"error: non-finite loss in steps {checked + 1}-{done} ({skipped.item():.0f} of them, their "
                         f"updates skipped); {ckpt_path} still holds the last good state")
    return done


def evaluate(probed, bank_set, query_set, fixed, grid, args, device, dtype, autocast):
    """One --knn-every evaluation, on rank 0 -> ({knn_top1, probe_top1 with --probe, lidar, rankme, alpha_req}, the
    fixed inputs of the label-free statistics: training images alone, no labels; made at the first evaluation)."""
    knn = knn_evaluate(probed, bank_set, query_set, device, dtype, args.workers, probe=args.probe)
    fixed = fixed or label_free_inputs(bank_set, lambda b, gen: sample_masks(
        b, grid, generator=gen, **config.mask_settings(args))[0], batch=args.batch_size, seed=args.seed)
    return dict(knn_top1=knn[0], **({"probe_top1": knn[2]} if args.probe else {}),
                **label_free_stats(probed, fixed, autocast)), fixed


def stop_message(monitor, stop, done, total, args, ckpt_path, log):
    """A run cut short: the collapse stop's error line, or (a signal, --stop-at) how to go on and the exit code."""
    if monitor.collapse_stop:
        return f"{monitor.collapse_stop}; not saved: {ckpt_path} holds the last save, if any"
    log(f"stopped by {'--stop-at' if done == args.stop_at else 'a signal'} after step {done}/{total}: {ckpt_path} "
        f"holds it; the same command with --auto-resume (or --resume) continues exactly", flush=True)
    return checkpoint.STOPPED_BY_SIGNAL


def final_knn(encoder, model, bank_set, query_set, args, device, dtype, log):
    """The end of a run: kNN of the trained encoder against a random-init one of the same shape."""
    knn = dict(zip(("knn_top1", "knn_top1_random"), knn_against_random_init(
        encoder, model["encoder"], bank_set, query_set, device, dtype, args.workers, args.seed + 1)))
    log(f"kNN top-1 on held-out images: trained encoder {knn['knn_top1']:.1f}%, random init "
        f"{knn['knn_top1_random']:.1f}%")
    return knn


# -------------------------------------------------------------------------------------------------- main

def main(argv=None):
    args = config.get_args(argv)
    # set up: processes, the run's folder, its precision; data, the run's length; networks; the state to go on from
    ddp, device, rank, world, log = setup_processes(args)
    ckpt_path, master, B = checkpoint.claim_run(args.out, args), rank == 0, args.batch_size
    recorded = checkpoint.peek(ckpt_path).get("args", {}).get("dtype") if args.resume else None
    dtype, autocast, scaler = setup_precision(args, device, log, recorded, model_config(args)["encoder"]["embed_dim"])
    torch.manual_seed(args.seed)
    train_set, bank_set, query_set, steps_per_epoch, total, warmup = setup_data(args, world)
    nets, optimizer, model = build(args, device, log)
    monitor, grid = Monitor(**config.monitor_settings(args)), (args.img_size // args.patch_size,) * 2
    ran_on = {**facts(device, dtype), **({"init": args.init} if args.init else {})}  # all that decides the numbers
    start = resume(ckpt_path, nets, optimizer, scaler, model, monitor, args, log) if args.resume else 0
    wrap(nets, args, device, ddp)
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=data.StepBatches(len(train_set), B, rank, world, args.seed, start, total),
        num_workers=args.workers, pin_memory=device.type == "cuda")
    said = " ".join(f"{k}={v}" for k, v in ran_on.items())
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"]) / 1e6
    log(f"I-JEPA: {args.model}/{args.patch_size} at {args.img_size}px, {trained:.1f}M trained params, {len(train_set)} "
        f"images, {world} process(es) x batch {B}, {total} steps, target={args.target}; {said}")
    runlog = RunLog(os.path.join(args.out, "log.csv"), LOG_COLUMNS, start if args.resume else None, said, log, master,
                    B * world, total)
    stop, fixed, step, checked = False, None, start, start
    skipped = torch.zeros((), device=device)  # steps skipped for a non-finite loss since `checked`
    asked, previous_handlers = checkpoint.catch_stop_signals()
    probed = nets.online if args.target == "frozen" else nets.target  # a frozen target learns nothing: the student

    for step, (imgs, _) in enumerate(loader, start=start):
        # the schedules, pure functions of the step; the masks, of (seed, step)
        lr, wd, m = set_schedules(optimizer, step, total, warmup, args)
        imgs = imgs.to(device, non_blocking=True)
        masks_ctx, masks_tgt, view = step_masks(args, step, rank, world, grid, imgs)
        # the I-JEPA step (a non-finite loss is counted on the device, read where the loop waits anyway)
        loss, feats, terms, bad = train_step(
            nets, optimizer, scaler, autocast, imgs, masks_ctx, masks_tgt, m if args.target == "ema" else None,
            view=view, sigreg_generator=torch.Generator().manual_seed(args.seed * 1_000_003 + step + 7),
            **config.loss_settings(args, monitor.reg_scale))  # SIGReg's directions: the same on every rank
        skipped += bad
        done = step + 1
        runlog.timed(step - start)
        # watch: an evaluation on rank 0 every --knn-every steps; the log line; the monitor's decisions, for all ranks
        knn_due = bool(args.knn_every) and done % args.knn_every == 0  # the same on every rank
        evaluated, fixed = evaluate(probed, bank_set, query_set, fixed, grid, args, device, dtype, autocast) if (
            knn_due and master) else ({}, fixed)
        new_best = evaluated.get("knn_top1", -math.inf) > monitor.best_knn  # best.pt holds the kNN peak
        if done % args.log_every == 0 or done == total or step == 0 or knn_due:
            checked = stop_if_skipped(skipped, checked, done, ckpt_path)
            runlog.line(dict(step=done, epoch=step // steps_per_epoch, loss=loss.item(), lr=lr, wd=wd, momentum=m,
                             **{f"loss_{k}": v.item() for k, v in terms.items()}, **evaluated,
                             weight_vicreg=args.vicreg * monitor.reg_scale,
                             weight_sigreg=args.sigreg * monitor.reg_scale), feats, monitor, device)
            for line in monitor.act(done, evaluated["knn_top1"], terms["pred"].item()) if evaluated else []:
                log(line, flush=True)
            monitor.agree(device, done)
        if monitor.collapse_stop:  # nothing saved: latest.pt keeps the last state from before the collapse
            break
        # save: every --save-every steps, at the end, at a new best, before a stop
        stop = checkpoint.stop_requested(asked, device) or done == args.stop_at
        if done % args.save_every == 0 or done == total or stop or new_best or monitor.early:  # on every rank but
            checked = stop_if_skipped(skipped, checked, done, ckpt_path)  # new_best, which falls on a log line
            if master:
                checkpoint.save_run(args.out, checkpoint.checkpoint_state(
                    trained_modules(nets), optimizer, scaler, done, config=model, epoch=done // steps_per_epoch,
                    args=vars(args), machine=ran_on, **monitor.state_dict()), new_best)
        if stop or monitor.early:
            break
        runlog.restart()  # the next interval is data + step only, not kNN, logging or saving

    # the end: a stop's exit, or kNN of the trained encoder against a random-init one, and the summary
    checkpoint.restore_signals(previous_handlers)
    if stop or monitor.collapse_stop:
        end_processes(nets, ddp)
        raise SystemExit(stop_message(monitor, stop, done, total, args, ckpt_path, log))
    knn = final_knn(probed, model, bank_set, query_set, args, device, dtype, log) if (
        master and query_set is not None) else {}
    summary = runlog.summary(step + 1 - start if total > start else 0, device, **monitor.summary(total), **knn,
                             **ran_on)
    end_processes(nets, ddp)
    return summary


if __name__ == "__main__":
    main()
