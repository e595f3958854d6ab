"""Watch and act: the seed's fourth rule. A collapsed encoder (every image mapped to one vector) makes any
prediction loss zero, so the loss alone proves nothing; what shows collapse is the spread of the features.

Read top to bottom, in the order a run meets them:
  1. the statistics of the target's features at a log line: per-dimension std and effective rank of the
     pooled features (RankMe), how alike one image's tokens are (`token_share`), SIGReg's Gaussianity test;
  2. the alarm, `collapse_suspected`: the std or the rank fell far below their start, or the rank lies
     nearly on one line;
  3. the actions, at each evaluation of quality (kNN): keep the best (best.pt's record), lower a regulariser
     that steers the features while the predictor has it easy, stop early once quality stalls, or stop on
     collapse; each decision taken once, on rank 0, and followed by every rank.

Nothing here knows about I-JEPA's networks; another loop uses it as this toy does (torch and losses.py only):

    import torch
    from monitor import Monitor

    monitor = Monitor(early_stop=3)                  # every action is off unless asked for
    for step in range(1, 101):
        feats = torch.randn(64, 16, 192)             # your step here; feats: the target's output (B, N, D)
        if step == 1 or step % 10 == 0:              # a log line; the first is the alarm's yardstick
            stats = monitor.watch(feats, step, loss_pred=0.5)
        if step % 20 == 0:                           # an evaluation: your measure of quality (kNN here)
            for line in monitor.act(step, knn=50.0):
                print(line)
        monitor.agree(torch.device("cpu"), step)     # under torchrun: every rank takes the same decisions
        if monitor.early or monitor.collapse_stop:   # kNN stalled since step 20: stops at step 80
            break

Thresholds and their origin: RESULTS.md, answer 7 (chosen on the study's logs before any rule ran).
"""
import math

import torch
import torch.distributed as dist

from losses import sigreg

# ------------------------------------------------------------------------------------------ statistics


@torch.no_grad()
def collapse_stats(z):
    """Collapse statistics of features z (n, D): {"std_mean", "std_min", "eff_rank"} as floats.

    std: per-dimension standard deviation over the n samples (near 0 = collapse to a constant).
    eff_rank: exp of the entropy of the normalised singular values (RankMe, Garrido et al. 2023);
    D for isotropic features, 1 for features that all lie on one line (dimensional collapse).
    """
    z = z.float()
    std = z.std(dim=0)
    return {"std_mean": std.mean().item(), "std_min": std.min().item(), "eff_rank": rankme(z, eps=1e-12).item(),
            "width": min(z.shape)}


@torch.no_grad()
def rankme(z, eps=1e-7):
    """RankMe (Garrido et al., ICML 2023) of embeddings z (n, D): exp of the entropy of the singular values
    normalised to sum 1 (plus eps, the paper's 1e-7) -> a 0-d tensor, from 1 (one direction) to min(n, D)."""
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(1e-12) + eps
    return torch.exp(-(p * p.log()).sum())


@torch.no_grad()
def token_share(feats):
    """How alike the tokens of one image are, (B, N, D) -> a float: the share of their energy in the image's
    mean token, N |mean|^2 / sum |token|^2, averaged over images. 1 when every token of an image is the same
    vector (the image is one point, whatever its patches hold); near 1/N for tokens that cancel out. Tells a
    regulariser that flattens each image into one vector from one that spreads the images apart."""
    feats = feats.float()
    energy = feats.pow(2).sum(dim=(1, 2)).clamp_min(1e-12)  # (B,)
    return (feats.shape[1] * feats.mean(dim=1).pow(2).sum(-1) / energy).mean().item()


@torch.no_grad()
def feature_stats(feats, seed=0):
    """Everything the log line shows of the target's output feats (B, N, D): collapse_stats of the pooled
    features, token_share, and SIGReg's statistic along fixed directions (a label-free collapse signal:
    ~1 for Gaussian features, far larger for collapsed ones)."""
    pooled = feats.mean(dim=1)  # (B, D)
    return {**collapse_stats(pooled), "token_share": token_share(feats),
            "sigreg": sigreg(pooled, generator=torch.Generator().manual_seed(seed)).item()}


# --------------------------------------------------------------------------- quality without labels

@torch.no_grad()
def lidar(views, delta=1e-4, eps=1e-7):
    """LiDAR (Thilak et al., ICLR 2024) of embeddings views (n, q, D), q views of each of n images, each image a
    class of the surrogate task -> a float: the effective rank (as RankMe's) of the LDA matrix
    Sw^-1/2 Sb Sw^-1/2, where Sb is the covariance of the n image means and Sw the views' covariance around their
    image's mean plus delta I (the paper's 1e-4; eps its 1e-7). It counts the directions that tell images apart
    beyond what tells one image's views apart: q - 1 for images drawn from q classes, 1 (the floor) when no
    direction does. RankMe counts every direction of spread, informative or not."""
    e = views.double()
    n, q, D = e.shape
    means = e.mean(dim=1)  # (n, D)
    between = (means - means.mean(dim=0)).T @ (means - means.mean(dim=0)) / (n - 1)  # (D, D)
    spread = (e - means[:, None]).reshape(-1, D)  # (n q, D)
    within = spread.T @ spread / (n * (q - 1)) + delta * torch.eye(D, dtype=e.dtype)
    values, vectors = torch.linalg.eigh(within)
    whiten = vectors @ torch.diag(values.rsqrt()) @ vectors.T  # Sw^-1/2
    lam = torch.linalg.eigvalsh(whiten @ between @ whiten).clamp_min(0)
    p = lam / lam.sum().clamp_min(1e-300) + eps
    return torch.exp(-(p * p.log()).sum()).item()


@torch.no_grad()
def alpha_req(z):
    """alpha-ReQ (Agrawal et al., NeurIPS 2022) of embeddings z (n, D): the decay alpha of the covariance's
    eigenvalues as a power law, lambda_i ~ i^-alpha, fitted by least squares in log-log over the positive ones
    -> a float. Small alpha: spread over many directions (white noise: ~0); large: a few carry it all."""
    zc = z.double() - z.double().mean(dim=0)
    lam = torch.linalg.eigvalsh(zc.T @ zc / (len(z) - 1)).flip(0)
    lam = lam[lam > lam[0] * 1e-12]
    x, y = torch.arange(1, len(lam) + 1, dtype=torch.float64).log(), lam.log()
    x, y = x - x.mean(), y - y.mean()
    return -(x @ y / (x @ x)).item()


def label_free_inputs(images, draw_masks, n=1000, views=10, batch=64, seed=0):
    """The fixed inputs of label_free_stats: n of `images` (a data set of (image, label) items, labels unread; the
    training images centre-cropped in train.py) in chunks of `batch`, each chunk with `views` context masks drawn by
    draw_masks(b, generator) as training draws them. A generator of their own: every other number of a run stays
    as it would be without them -> [(images (b, 3, H, W), [masks (b, Kc)] * views)]."""
    gen = torch.Generator().manual_seed(seed + 2**31)
    x = torch.stack([images[i][0] for i in torch.randperm(len(images), generator=gen)[:n].tolist()])  # (n, 3, H, W)
    return [(x[i:i + batch], [draw_masks(len(x[i:i + batch]), gen) for _ in range(views)])
            for i in range(0, len(x), batch)]


@torch.no_grad()
def label_free_stats(encoder, chunks, autocast):
    """LiDAR, RankMe and alpha-ReQ of `encoder` on fixed unlabelled images, average-pooled as the probes pool:
    RankMe and alpha-ReQ of the whole images' embeddings; LiDAR of q views of each image, a view being the
    encoder fed the patches of one context mask, as in training. chunks: [(images (b, 3, H, W), q context masks
    of those images, each (b, Kc))] -> {"lidar", "rankme", "alpha_req"}."""
    device = next(encoder.parameters()).device
    whole, views = [], []
    for x, masks in chunks:
        x = x.to(device)
        with autocast:
            whole.append(encoder(x).mean(dim=1).float().cpu())  # (b, D)
            views.append(torch.stack([encoder(x, m.to(device)).mean(dim=1).float().cpu() for m in masks], 1))
    whole = torch.cat(whole)
    return {"lidar": lidar(torch.cat(views)), "rankme": rankme(whole).item(), "alpha_req": alpha_req(whole)}


# ---------------------------------------------------------------------------------------------- the alarm

def collapse_suspected(stats, start):
    """The monitor's alarm: the per-dimension std fell below a tenth of its value at the start of the run,
    or the effective rank below a fifth of it, below 1.5 (the features lie nearly on one line), or below 4%
    of the width it could reach (min(batch, features), stats["width"]). The floors matter because a
    random-init encoder can start near rank 3 (cifar10-mini), where a fifth is under 1: a target moved too
    fast (--ema 0 0) sat at rank 1.3, and the small preset without VICReg at rank 2.5 of 64 for a whole
    run, both unflagged by the relative rule alone. 4% of 64 is 2.56: over the 21 study runs logged, no
    healthy run went below 2.61 after its first step, and the dimensionally collapsed ones sat at 1.1-2.5."""
    return (stats["std_mean"] < 0.1 * start["std_mean"]
            or stats["eff_rank"] < max(0.2 * start["eff_rank"], 1.5, 0.04 * stats.get("width", 0)))


# -------------------------------------------------------------------------------------------- the actions

class Monitor:
    """The fourth rule's state and decisions. Its state (the step-1 yardstick, best.pt's record, evaluations
    since quality last gained, the regularisers' weight scale) goes into every checkpoint (state_dict) and
    comes back on resume, so a resumed run decides as an uninterrupted one. After `agree`, `collapse_stop` holds
    the message that ends the run on collapse (None while it goes on) and `early` the step at which the rule stops
    it early (0 while it goes on)."""

    def __init__(self, *, stop_on_collapse=False, early_stop=0, early_stop_margin=0.5, lower_reg=0.0,
                 lower_reg_drop=2.0, lower_reg_loss=0.4, seed=0):
        self.stop_on_collapse, self.early_stop, self.margin = stop_on_collapse, early_stop, early_stop_margin
        self.lower_reg, self.lower_reg_drop, self.lower_reg_loss = lower_reg, lower_reg_drop, lower_reg_loss
        self.seed = seed
        self.reference, self.best_step, self.best_knn, self.stale_evals, self.reg_scale = None, 0, -1.0, 0, 1.0
        self.warned, self.early = False, 0
        self.collapse_stop = None

    def watch(self, feats, step, loss_pred=None):
        """The statistics of feats (B, N, D) at a log line -> stats (feature_stats, loss_pred, and "warning": the
        alarm's line or None). The first call is the yardstick the alarm compares with (step 1 in train.py)."""
        stats = {**feature_stats(feats, self.seed), "loss_pred": loss_pred}
        self.reference = self.reference or stats
        self.warned = step > 1 and collapse_suspected(stats, self.reference)
        stats["warning"] = (f"warning: representation collapse suspected at step {step}: std {stats['std_mean']:.4f} "
                            f"(start {self.reference['std_mean']:.4f}), eff_rank {stats['eff_rank']:.2f} "
                            f"(start {self.reference['eff_rank']:.2f})") if self.warned else None
        return stats

    def act(self, step, knn, loss_pred=None):
        """The rule, "adjust loss weights or stop when collapse is detected", at one evaluation where quality
        (kNN, in %) was measured -> the lines saying what it did and why. Keeps best.pt's record. Lower (C-JEPA's
        advice): kNN fell lower_reg_drop points below its best while the prediction loss is under lower_reg_loss
        of its step-1 value; the weights are multiplied by lower_reg, again at each evaluation while that lasts.
        Stop: kNN has not beaten its best by the margin for early_stop evaluations in a row (sets `early`)."""
        said, best = [], self.best_knn
        pred_ratio = (loss_pred if loss_pred is not None else math.nan) / (
            (self.reference or {}).get("loss_pred") or math.nan)  # nan: unknown, never low
        if self.lower_reg and knn <= best - self.lower_reg_drop and pred_ratio < self.lower_reg_loss:
            self.reg_scale *= self.lower_reg
            said.append(f"rule: kNN {knn:.1f}% is {best - knn:.1f} points below its best {best:.1f}% (step "
                        f"{self.best_step}) while the prediction loss is {pred_ratio:.2f} of its step-1 value: the "
                        f"regularisers' weights x{self.reg_scale:.3g} from step {step + 1} "
                        f"(--lower-reg {self.lower_reg})")
        self.stale_evals = 0 if knn > best + self.margin else self.stale_evals + 1
        if knn > best:
            self.best_step, self.best_knn = step, knn
        self.early = step if self.early_stop and self.stale_evals >= self.early_stop else 0  # the step it stopped at
        if self.early:
            said.append(f"rule: kNN has not beaten {self.best_knn:.1f}% by {self.margin} points for "
                        f"{self.early_stop} evaluations: stopping early at step {step} (--early-stop); best.pt holds "
                        f"step {self.best_step}")
        return said

    def agree(self, device, step=0):
        """Every rank takes the same decisions: one all-reduce in which each rank gives its alarm and rank 0 its
        rule's (the weight scale, the early stop), so the ranks stop together or go on together, never one alone
        (which would leave the others waiting in the next collective). Sets `collapse_stop` where the alarm fired
        on any rank and stop_on_collapse. A single process needs no collective."""
        fired = [self.warned]
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
            shared = torch.zeros(world + 2, dtype=torch.float64, device=device)
            shared[rank] = float(self.warned)
            if rank == 0:  # x + 0 = x exactly: the other ranks' zeros leave rank 0's values as they are
                shared[world], shared[world + 1] = self.reg_scale, self.early
            dist.all_reduce(shared)
            fired, self.reg_scale, self.early = shared[:world].tolist(), shared[world].item(), int(shared[world + 1])
        if self.stop_on_collapse and any(fired):
            where = f" on rank {', '.join(str(r) for r, f in enumerate(fired) if f)} of {len(fired)}" * (len(fired) > 1)
            self.collapse_stop = f"error: stopped on collapse at step {step}{where} (--stop-on-collapse)"

    def summary(self, total):
        """For a run's summary line: best.pt's record once quality was measured; where the rule stopped the run."""
        return {**(dict(best_step=self.best_step, best_knn=self.best_knn) if self.best_knn >= 0 else {}),
                **(dict(stopped_early_at=self.early, steps_saved=total - self.early) if self.early else {})}

    def state_dict(self):
        """What a checkpoint holds of the monitor, under the keys train.py has always saved."""
        return dict(monitor_reference=self.reference, best_step=self.best_step, best_knn=self.best_knn,
                    stale_evals=self.stale_evals, reg_scale=self.reg_scale)

    def load_state_dict(self, ckpt):
        """From a checkpoint (state_dict's keys; one saved before the rule existed lacks some: their defaults)."""
        self.reference = ckpt.get("monitor_reference")
        self.best_step, self.best_knn = ckpt.get("best_step", 0), ckpt.get("best_knn", -1.0)
        self.stale_evals, self.reg_scale = ckpt.get("stale_evals", 0), ckpt.get("reg_scale", 1.0)
