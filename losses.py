"""Prediction losses, the pixel targets, and the VICReg and SIGReg regularisers.

I-JEPA regresses the target encoder's (layer-normalised) features at the target patches. The
paper writes an L2 loss (Sec. 3, Eq. 1); the official code uses smooth-L1 (`F.smooth_l1_loss` in
src/train.py). A collapsed encoder (every image mapped to the same vector) makes any of these losses
zero, so a low loss alone proves nothing: monitor.py's statistics tell a healthy run from a
collapsed one. `vicreg_loss` is the optional explicit guard of C-JEPA (Mo & Tong, 2024), which adds
VICReg's variance and covariance terms (Bardes et al., ICLR 2022) on the online embeddings. `sigreg` is
LeJEPA's (Balestriero & LeCun, 2025): it pushes embeddings toward an isotropic Gaussian, with which LeJEPA
trains without a stop-gradient or an EMA teacher.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def jepa_loss(pred, target, kind="smooth_l1", *, stop_gradient=True):
    """Mean prediction loss between pred and target, both (..., D); a scalar.

    kind: "smooth_l1" (official code, beta 1), "l2" (the paper's Eq. 1, mean squared error) or
    "cosine" (1 - cosine similarity per token). With stop_gradient (the default and the I-JEPA
    recipe) no gradient reaches the target branch even if the caller forgot no_grad; the collapse
    study turns it off to let gradients flow through a shared target encoder.
    """
    if stop_gradient:
        target = target.detach()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "l1":  # V-JEPA's regression loss
        return F.l1_loss(pred, target)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1).mean()
    raise ValueError(f"unknown loss kind {kind!r}: use smooth_l1, l2, l1 or cosine")


def pixel_targets(imgs, p):
    """The pixel auxiliary loss's targets (train.py --rgb-aux): (B, 3, H, W) -> (B, N, 3 p p) pixels per
    patch, each patch normalised to zero mean and unit variance (MAE's normalised-pixel target), in the
    patch order of the encoder."""
    x = imgs.unfold(2, p, p).unfold(3, p, p)  # (B, 3, H/p, W/p, p, p)
    x = x.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (B, N, 3 p p)
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()


def vicreg_loss(z, std_target=1.0, eps=1e-4):
    """VICReg variance and covariance terms of z (n, D) -> (variance_term, covariance_term).

    variance: mean over dimensions of relu(std_target - std), a hinge that keeps every feature
    spread across the batch. covariance: squared off-diagonal covariance summed and divided by D,
    which decorrelates features so they cannot all encode the same thing.
    """
    z = z.float()
    n, D = z.shape
    std = torch.sqrt(z.var(dim=0) + eps)  # (D,)
    variance = F.relu(std_target - std).mean()
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / (n - 1)  # (D, D)
    off_diag = cov - torch.diag(torch.diag(cov))
    return variance, off_diag.pow(2).sum() / D


def sigreg(z, num_slices=256, generator=None, t_max=3.0, knots=17):
    """SIGReg of z (n, D): the Epps-Pulley statistic of z's projections on `num_slices` random unit
    directions, averaged -> a scalar, ~1 for samples of N(0, I) and far larger for collapsed, low-rank
    or shifted ones. Per direction, n * integral |ecf(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt over t in
    [-t_max, t_max] by the trapezoid rule on `knots` points (the paper's 17 on [0, 3], doubled by
    symmetry). Under DDP the empirical characteristic functions are averaged over ranks, so every rank
    tests the global batch; pass the same generator (seeded by seed and step) on every rank. LeJEPA uses
    ~1024 slices and weighs it 0.05 against 0.95 for the prediction loss."""
    z = z.float()
    n, D = z.shape
    directions = torch.randn(D, num_slices, generator=generator).to(z.device)
    x = z @ (directions / directions.norm(dim=0))  # (n, M) projections
    t = torch.linspace(0, t_max, knots, device=z.device)
    phi = torch.exp(-0.5 * t**2)  # the standard normal's characteristic function, and the weight
    weights = torch.full_like(t, 2 * t_max / (knots - 1))
    weights[[0, -1]] /= 2
    xt = x.unsqueeze(-1) * t  # (n, M, K)
    cos, sin = xt.cos().mean(0), xt.sin().mean(0)  # (M, K): real and imaginary parts of the ecf
    if dist.is_available() and dist.is_initialized():  # the global batch's ecf (gradients flow back)
        from torch.distributed._functional_collectives import all_reduce  # differentiable: grads are summed
        world = dist.get_world_size()
        cos, sin = (all_reduce(v, "sum", dist.group.WORLD) / world for v in (cos, sin))
        n *= world
    return n * (((cos - phi) ** 2 + sin**2) @ (weights * phi)).mean()
