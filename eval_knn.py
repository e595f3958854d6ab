"""Weighted k-nearest-neighbour evaluation of frozen encoder features, for our checkpoints and the official ones.

The paper reports linear probes; kNN on frozen features (Wu et al. 2018; DINO's eval_knn.py) needs
no training, so it is the quick, honest check used during training and for the demo. Features are
the encoder output average-pooled over patches (as the paper's probes) and L2-normalised; each query
takes its k most similar training images and adds exp(similarity / T) to each neighbour's class.
The official release ships no evaluation code.

    python eval_knn.py --ckpt runs/demo/latest.pt --data ./cifar10      # ROOT/train is the bank, ROOT/val the queries
    python eval_knn.py --random-init --model vit_tiny --patch-size 4 --img-size 32 --data ./cifar10
"""
import argparse
import os
import pickle

import torch
import torch.nn.functional as F

import models
from data import CenterCrop, ImageFolder


# ------------------------------------------------------------------------------------ checkpoints

def load_checkpoint(path):
    """torch.load with weights_only=True: tensors and plain containers only, never pickled code."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(f"error: refusing to load {path}: it holds pickled objects other than tensors "
                         f"and plain containers, which could run code ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError) as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({str(e).splitlines()[0]})") from None


def encoder_config_from_weights(state, patch_size=None):
    """Infer the architecture of an official checkpoint, which stores no config, from its shapes."""
    proj = state["patch_embed.proj.weight"]  # (D, 3, p, p)
    dim, depth = proj.shape[0], len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    heads = {c["embed_dim"]: c["num_heads"] for c in models.VIT_CONFIGS.values()}.get(dim)
    if heads is None:
        raise SystemExit(f"error: no official ViT has width {dim}; cannot infer the number of heads")
    patch = patch_size or proj.shape[-1]
    side = int(round(state["pos_embed"].shape[1] ** 0.5))
    return dict(img_size=side * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim)


def load_encoder(path, which="target", patch_size=None):
    """Rebuild an encoder from our checkpoint (config stored in it) or an official one (.pth.tar with
    `module.`-prefixed encoder / target_encoder dicts and no config)."""
    ckpt = load_checkpoint(path)
    key = {"target": "target_encoder", "context": "encoder"}[which]
    if key not in ckpt:
        raise SystemExit(f"error: {path} has no '{key}' weights (keys: {', '.join(map(str, ckpt))})")
    state = {k.removeprefix("module."): v for k, v in ckpt[key].items()}
    config = ckpt["config"]["encoder"] if "config" in ckpt else encoder_config_from_weights(state, patch_size)
    encoder = models.VisionTransformer(**config)
    encoder.load_state_dict(state)
    return encoder


# ---------------------------------------------------------------------------------------------- kNN

@torch.no_grad()
def extract_features(encoder, loader, device, dtype=torch.float32):
    """Average-pooled, L2-normalised encoder features: (n, D) float32 and labels (n,)."""
    encoder.eval()
    feats, labels = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            z = encoder(x.to(device, non_blocking=True)).mean(dim=1)  # (B, N, D) -> (B, D)
        feats.append(F.normalize(z.float(), dim=1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def knn_classify(bank, bank_labels, queries, query_labels, k=20, temperature=0.07, chunk=1024):
    """Weighted kNN top-1 / top-5 accuracy in percent. Queries go in chunks of `chunk`, so memory is
    (chunk x bank size) whatever the number of queries; a query set smaller than a chunk is one chunk."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    k = min(k, len(bank))
    top1 = top5 = 0
    for start in range(0, len(queries), chunk):
        sim = queries[start:start + chunk] @ bank.T  # (c, n) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (c, k)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())
        ranked = votes.topk(min(5, num_classes), dim=1).indices  # (c, <=5)
        truth = query_labels[start:start + chunk].unsqueeze(1)
        top1 += (ranked[:, :1] == truth).sum().item()
        top5 += (ranked == truth).any(dim=1).sum().item()
    return 100.0 * top1 / len(queries), 100.0 * top5 / len(queries)


def knn_evaluate(encoder, bank_loader, query_loader, device, dtype=torch.float32, k=20, temperature=0.07):
    """The function train.py calls: features of both sets, then weighted kNN -> (top1, top5)."""
    bank, bank_labels = extract_features(encoder, bank_loader, device, dtype)
    queries, query_labels = extract_features(encoder, query_loader, device, dtype)
    return knn_classify(bank, bank_labels, queries, query_labels, k, temperature)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="our latest.pt, or an official .pth.tar")
    p.add_argument("--data", required=True, help="ROOT with train/ (the memory bank) and val/ (the queries)")
    p.add_argument("--which", choices=["target", "context"], default="target",
                   help="which encoder: the paper evaluates the target (EMA) encoder")
    p.add_argument("--random-init", action="store_true", help="evaluate an untrained encoder: the control")
    p.add_argument("--model", default="vit_tiny", help="with --random-init (or to force an official file's shape)")
    p.add_argument("--depth", type=int, default=None,
                   help="with --random-init: encoder depth if not the model's (as train.py --depth)")
    p.add_argument("--patch-size", type=int, default=None, help="with --random-init (default 16) or an official file")
    p.add_argument("--img-size", type=int, default=None, help="evaluation size (default: the size trained at)")
    p.add_argument("--k", type=int, default=20, help="neighbours; 20 as DINO, which found 10-20 best on ImageNet")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim/T); 0.07 as DINO")
    p.add_argument("--grayscale", action="store_true",
                   help="bank and queries in grayscale: a diagnostic of how much of the score is colour")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass; memory only")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes for decoding")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init control")
    args = p.parse_args(argv)
    if args.random_init:
        if args.model not in models.VIT_CONFIGS:
            raise SystemExit(f"error: unknown --model {args.model}: choose from {', '.join(models.VIT_CONFIGS)}")
        torch.manual_seed(args.seed)
        encoder = models.VisionTransformer(img_size=args.img_size or 224, patch_size=args.patch_size or 16,
                                           **models.vit_config(args.model, args.depth))
    elif args.ckpt:
        encoder = load_encoder(args.ckpt, args.which, args.patch_size)
    else:
        raise SystemExit("error: give --ckpt PATH or --random-init")
    size = args.img_size or encoder.grid[0] * encoder.patch_size
    device = torch.device(args.device)
    sets = [ImageFolder(os.path.join(args.data, split), CenterCrop(size, args.grayscale)) for split in ("train", "val")]
    loaders = [torch.utils.data.DataLoader(s, batch_size=args.batch_size, num_workers=args.workers) for s in sets]
    top1, top5 = knn_evaluate(encoder.to(device), *loaders, device, k=args.k, temperature=args.temperature)
    where = args.data + (" in grayscale" if args.grayscale else "")
    print(f"kNN (k={args.k}, T={args.temperature}) on {where}: top-1 {top1:.2f}%  top-5 {top5:.2f}%")
    print(f"summary: knn_top1={top1:.2f} knn_top5={top5:.2f}")


if __name__ == "__main__":
    main()
