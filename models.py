"""The two networks of I-JEPA: a ViT encoder and a narrow, deep ViT predictor.

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture",
CVPR 2023, Sec. 3 and Appendix A. The context encoder sees only the context patches; the target
encoder (an EMA copy, see ema.py) sees the whole image; the predictor receives the context tokens plus
one mask token per target patch and predicts the target encoder's features at those patches.

Shape legend, used in every docstring and shape comment below:
    B  images in the batch          N  patches per image (grid H x W)
    D  encoder width                d  predictor width
    M  target blocks per image      Kc / Kt  kept tokens per context / per target block

Parameter names are exactly those of the official release (facebookresearch/ijepa,
src/models/vision_transformer.py), so its checkpoints load once the DDP `module.` prefix is
stripped. Deliberate differences from that file:
  * on GPU, attention goes through F.scaled_dot_product_attention's flash kernel instead of a
    materialised softmax (same result up to float rounding); on CPU it is written out as the
    official, which measured faster there (see `attention`);
  * pos_embed is a buffer, not a frozen Parameter: same state_dict key, but it can never reach an
    optimizer by accident;
  * position embeddings work for non-square grids and are interpolated without assuming a cls token
    (the official `interpolate_pos_encoding` drops the first row as if it were one);
  * no dropout / drop-path / ConvEmbed code paths: I-JEPA trains with all of them at zero.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from masks import apply_masks


def sincos_pos_embed(dim, grid_h, grid_w):
    """Fixed 2-D sin-cos position table (MAE / official `get_2d_sincos_pos_embed`), (H*W, dim).

    The first half of the channels encodes the column, the second half the row: the official code
    calls meshgrid(w, h) and names the halves the other way round, but this is what it computes,
    and matching it is what makes the released weights give the same outputs.
    """
    assert dim % 4 == 0, f"embedding width {dim} must be divisible by 4 for a 2-D sin-cos table"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def embed_1d(pos):  # (H*W,) -> (H*W, dim/2)
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # (H*W, dim)


def resize_pos_embed(pos_embed, old_grid, new_grid):
    """Bicubic resize of a (1, H*W, dim) table to another (H', W') grid, no cls token assumed."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    table = pos_embed.reshape(1, *old_grid, dim).permute(0, 3, 1, 2)  # (1, dim, H, W)
    table = F.interpolate(table, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(1, -1, dim)  # (1, H'*W', dim)


GPU_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # no cuDNN: see below


def attention(q, k, v):
    """softmax(q k^T / sqrt(head_dim)) v over (B, heads, T, head_dim) tensors."""
    if q.device.type == "cpu":
        # Written out on CPU (as the official Attention does everywhere). Measured in one process at bench.py's
        # config (A): the fused CPU flash kernel's backward was ~10x its forward, and SDPA's MATH backend adds
        # per-call mask checks (aten::all/isneginf/where); this plain form made the whole step ~10% faster.
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    # Flash attention on GPU: the (T, T) matrix never materialises. The backends are named because recent
    # PyTorch prefers cuDNN's attention on Hopper, which builds an execution plan per new sequence length on
    # the host: with context lengths that change every step, that cost ~4 ms of CPU per call (measured on an
    # H100, torch 2.11: ~60% of a ViT-L step's host time), while FlashAttention-2 takes any length as is.
    with sdpa_kernel(GPU_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, T, C/heads)
        x = attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; LayerNorm eps 1e-6 as in the official factories."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, C, H*p, W*p) -> (B, H*W, D)
        return self.proj(x).flatten(2).transpose(1, 2)


def init_weights(module, blocks, std=0.02):
    """The official init, applied once: truncated normal(std) for Linear and Conv weights, zero
    biases, LayerNorm 1/0, and the residual projections of block i (1-based) divided by sqrt(2 i)
    so that the residual stream's variance does not grow with depth (official `fix_init_weight`).
    The official `init_model` then re-runs the plain init over every module and silently erases
    that rescaling; we keep it, as the model files intend."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)  # cut at +-2 absolute, as the official
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for i, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))


class VisionTransformer(nn.Module):
    """ViT encoder without a cls token. Used twice: as the context encoder (with `masks`) and as
    the target encoder (full image)."""

    def __init__(self, *, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True):
        super().__init__()
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else img_size
        if img_h % patch_size or img_w % patch_size:
            raise ValueError(f"image size {img_h}x{img_w} is not divisible by patch size {patch_size}")
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.grid = (img_h // patch_size, img_w // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, *self.grid).unsqueeze(0))  # (1, N, D)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        init_weights(self, self.blocks)

    def forward(self, x, masks=None):
        """x (B, 3, H*p, W*p) -> (B, N, D); with masks (B, K) of kept patch indices -> (B, K, D).
        Masked patches are dropped before the blocks, so the encoder pays only for what it sees."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.patch_embed(x)  # (B, N, D)
        x = x + resize_pos_embed(self.pos_embed, self.grid, grid).to(x.dtype)
        if masks is not None:
            x = apply_masks(x, masks)  # (B, K, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class VisionTransformerPredictor(nn.Module):
    """Narrow, deep ViT that predicts target-encoder features at the target positions (Sec. 3:
    "the predictor takes as input the output of the context encoder and, conditioned on positional
    mask tokens, predicts the representations of a target block")."""

    def __init__(self, *, num_patches, embed_dim, predictor_embed_dim=384, depth=12, num_heads=12,
                 mlp_ratio=4.0, grid=None):
        super().__init__()
        side = int(math.isqrt(num_patches))
        self.grid = tuple(grid) if grid is not None else (side, side)
        if self.grid[0] * self.grid[1] != num_patches:
            raise ValueError(f"num_patches={num_patches} is not a square: pass grid=(H, W)")
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        self.register_buffer("predictor_pos_embed",
                             sincos_pos_embed(predictor_embed_dim, *self.grid).unsqueeze(0))  # (1, N, d)
        self.predictor_blocks = nn.ModuleList(
            Block(predictor_embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)
        init_weights(self, self.predictor_blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, z, masks_ctx, masks_tgt):
        """z (B, Kc, D), masks_ctx (B, Kc), masks_tgt (B, M, Kt) -> predictions (B, M, Kt, D).

        Each target block is predicted in a sequence of its own (context tokens followed by that
        block's mask tokens), so blocks cannot see each other's positions; the M sequences are
        folded into the batch for one pass (the official code repeats the batch M times).
        """
        B, Kc, _ = z.shape
        M, Kt = masks_tgt.shape[1:]
        pos = self.predictor_pos_embed.expand(B, -1, -1)  # (B, N, d)
        ctx = self.predictor_embed(z) + apply_masks(pos, masks_ctx).to(z.dtype)  # (B, Kc, d)
        queries = self.mask_token + apply_masks(pos, masks_tgt).to(z.dtype)  # (B, M, Kt, d)
        x = torch.cat([ctx.unsqueeze(1).expand(-1, M, -1, -1), queries], dim=2)  # (B, M, Kc+Kt, d)
        x = x.flatten(0, 1)  # (B*M, Kc+Kt, d)
        for blk in self.predictor_blocks:
            x = blk(x)
        x = self.predictor_proj(self.predictor_norm(x[:, Kc:]))  # (B*M, Kt, D)
        return x.unflatten(0, (B, M))  # (B, M, Kt, D)


class Projector(nn.Sequential):
    """LeJEPA's projector (MINIMAL.md, as stable-pretraining's LeJEPA): Linear-BatchNorm-ReLU twice, 2048 wide,
    then a Linear to out_dim. (n, dim) -> (n, out_dim). SIGReg reads its output, not the encoder's: the ViT
    ends in a LayerNorm, which fixes every token's scale, and the BatchNorm lets the embedding move freely
    (LeWorldModel, arXiv 2603.19312, gives this reason). Trained with the encoder; evaluation never reads it."""

    def __init__(self, dim, out_dim, hidden=2048):
        super().__init__(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


# Official widths, depths and heads (src/models/vision_transformer.py); MLP ratio 4 except giant.
VIT_CONFIGS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16),
    "vit_giant": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
}


def vit_config(name, depth=None):
    """VIT_CONFIGS[name], with its depth replaced when `depth` is given (train.py/eval_knn.py --depth)."""
    return {**VIT_CONFIGS[name], **({"depth": depth} if depth else {})}


def vit_tiny(**kw): return VisionTransformer(**VIT_CONFIGS["vit_tiny"], **kw)
def vit_small(**kw): return VisionTransformer(**VIT_CONFIGS["vit_small"], **kw)
def vit_base(**kw): return VisionTransformer(**VIT_CONFIGS["vit_base"], **kw)
def vit_large(**kw): return VisionTransformer(**VIT_CONFIGS["vit_large"], **kw)
def vit_huge(**kw): return VisionTransformer(**VIT_CONFIGS["vit_huge"], **kw)
def vit_giant(**kw): return VisionTransformer(**VIT_CONFIGS["vit_giant"], **kw)
