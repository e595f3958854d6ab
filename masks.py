"""The multi-block mask sampler of I-JEPA, and the one gather helper the project uses.

Paper, Sec. 3 and Fig. 4: sample M = 4 (possibly overlapping) target blocks with scale 0.15-0.2
of the image and aspect ratio 0.75-1.5, and one large context block (scale 0.85-1.0, aspect 1)
from which every target patch is removed, so the predictor must infer the targets from an
informative, spatially distributed context rather than copy them. Large, semantic target blocks
and an informative context are what make the task non-trivial (Sec. 5, Table 6).

Mirrors `MaskCollator` in the official src/masks/multiblock.py, vectorised over the batch, with
these deliberate differences (each a known quirk of the official sampler):
  * scale and aspect ratio of the block size come from independent draws; the official code reuses
    one random number for both, so large blocks are always tall;
  * block positions are uniform over every valid offset, the last row and column included; the
    official `randint(0, H - h)` excludes the last offset, so blocks never touch the bottom row or
    the right column;
  * every random number comes from the caller's `torch.Generator`, so masks are a pure function of
    its seed; the official code draws positions from the global RNG;
  * context lengths are equalised across the batch by keeping a uniform random subset of each
    image's context, not by truncating sorted indices (which drops the bottom of the image);
    target blocks share one size per batch, so they need no equalising;
  * `min_keep` bounds the context (what the encoder sees); a target block is whatever size its scale
    gives. The official sampler also demands min_keep patches per target block and loops forever
    when blocks are smaller (32 px images with patch 4: 3x3 = 9 < 10). Here sampling is retried a
    bounded number of times and then fails with a ValueError that names the setting to change;
    the official sampler instead, after 20 failed draws, silently stops excluding target blocks
    from the context, so context and targets overlap.
"""
import math

import torch


def apply_masks(x, idx):
    """Gather kept tokens: x (B, N, D) with idx (B, K) -> (B, K, D); idx (B, M, K) -> (B, M, K, D)."""
    B, N, D = x.shape
    flat = idx.reshape(B, -1)  # (B, M*K)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(-1, -1, D))  # (B, M*K, D)
    return out.reshape(*idx.shape, D)


def _check_range(name, lo_hi, upper=None):
    lo, hi = lo_hi
    if not (0 < lo <= hi) or (upper is not None and hi > upper):
        bound = f"(0, {upper}]" if upper is not None else "(0, inf)"
        raise ValueError(f"{name}={tuple(lo_hi)} must satisfy 0 < low <= high within {bound}")


def _block_size(scale, aspect, grid, u_scale, u_aspect):
    """(h, w) of a block covering `scale` of the grid with aspect ratio h/w, clipped to the grid."""
    H, W = grid
    s = scale[0] + u_scale * (scale[1] - scale[0])
    a = aspect[0] + u_aspect * (aspect[1] - aspect[0])
    area = s * H * W
    h = min(max(round(math.sqrt(area * a)), 1), H)
    w = min(max(round(math.sqrt(area / a)), 1), W)
    return h, w


def _place_blocks(n, size, grid, generator):
    """Patch indices of n h x w blocks at uniform positions (every row and column reachable): (n, h*w)."""
    (h, w), (H, W) = size, grid
    top = torch.randint(0, H - h + 1, (n,), generator=generator)
    left = torch.randint(0, W - w + 1, (n,), generator=generator)
    offsets = (torch.arange(h).unsqueeze(1) * W + torch.arange(w)).flatten()  # (h*w,)
    return (top * W + left).unsqueeze(1) + offsets  # (n, h*w)


def sample_masks(batch_size, grid, *, num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                 context_scale=(0.85, 1.0), min_keep=10, allow_overlap=False, generator=None, max_tries=20,
                 context="block"):
    """Sample one batch of I-JEPA masks.

    grid: int or (H, W) in patches. Returns (masks_ctx (B, Kc), masks_tgt (B, M, Kt)), LongTensors of
    patch indices in [0, H*W); context indices are sorted. Deterministic given `generator`.
    context: "block" (I-JEPA: one large block minus the targets) or "complement" (V-JEPA, Bardes et al.
    2024: every patch outside the union of the targets; context_scale is then unused).
    """
    H, W = (grid, grid) if isinstance(grid, int) else tuple(grid)
    N, B, M = H * W, batch_size, num_targets
    _check_range("target_scale", target_scale, 1.0)
    _check_range("context_scale", context_scale, 1.0)
    _check_range("target_aspect", target_aspect)
    if M < 1:
        raise ValueError(f"num_targets={M} must be at least 1")
    if context not in ("block", "complement"):
        raise ValueError(f"context={context!r} must be 'block' or 'complement'")
    smallest_ctx = _block_size(context_scale, (1.0, 1.0), (H, W), 0.0, 0.0)
    if min_keep > smallest_ctx[0] * smallest_ctx[1]:
        raise ValueError(f"min_keep={min_keep} exceeds the {smallest_ctx[0] * smallest_ctx[1]} patches of the "
                         f"smallest context block on a {H}x{W} grid: lower min_keep or raise context_scale")

    # One block size per batch for the targets and one for the context (as the official collator),
    # so every image has the same Kt and, before equalising, a similar context length.
    u = torch.rand(3, generator=generator).tolist()
    tgt_size = _block_size(target_scale, target_aspect, (H, W), u[0], u[1])
    ctx_size = _block_size(context_scale, (1.0, 1.0), (H, W), u[2], 0.0)

    def sample(n):  # n images -> targets (n, M, Kt) and a boolean context map (n, N)
        tgt = _place_blocks(n * M, tgt_size, (H, W), generator).reshape(n, M, -1)
        keep = torch.zeros(n, N, dtype=torch.bool)
        if context == "complement":
            keep[:] = True
        else:
            keep.scatter_(1, _place_blocks(n, ctx_size, (H, W), generator), True)
        if not allow_overlap:  # remove every target patch from the context: no copying the answer
            keep.scatter_(1, tgt.flatten(1), False)
        return tgt, keep

    masks_tgt, keep = sample(B)
    for attempt in range(max_tries + 1):  # re-draw only the images whose context is too small
        bad = (keep.sum(1) < min_keep).nonzero().flatten()
        if len(bad) == 0:
            break
        if attempt == max_tries:
            raise ValueError(f"could not keep min_keep={min_keep} context patches on a {H}x{W} grid after "
                             f"{max_tries} tries: lower min_keep or target_scale, or raise context_scale")
        masks_tgt[bad], keep[bad] = sample(len(bad))

    # Equalise context lengths with a uniform random subset of each image's context: random keys on
    # the kept patches, +inf-like keys elsewhere, keep the Kc smallest, restore spatial order.
    Kc = int(keep.sum(1).min())
    keys = torch.rand(B, N, generator=generator).masked_fill(~keep, 2.0)
    masks_ctx = keys.argsort(dim=1)[:, :Kc].sort(dim=1).values  # (B, Kc)
    return masks_ctx, masks_tgt
