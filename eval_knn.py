"""Frozen-feature evaluation: weighted kNN and a linear probe, for our checkpoints and the official ones.

Features are the target encoder's output average-pooled over patches (as the paper's probes). kNN (Wu
et al. 2018; DINO's eval_knn.py) needs no training, so it is the quick check used during training: each
L2-normalised query takes its k most similar training images and adds exp(similarity / T) to each
neighbour's class. The linear probe is the paper's headline metric, done the cheap, deterministic way
(see `linear_probe`). The official release ships no evaluation code.

    python eval_knn.py --ckpt runs/cifar/latest.pt --data ./cifar10 --controls   # ROOT/train fits, ROOT/val scores
    python eval_knn.py --random-init --model vit_tiny --patch-size 4 --img-size 32 --data ./cifar10
    python eval_knn.py --ckpt vith14/ --data ./cifar100 --layers 4   # a transformers folder; the paper's last four
"""
import argparse
import os

import torch
import torch.nn.functional as F

import models
from export import load_encoder  # any of the four formats: ours, official, transformers, timm


# ---------------------------------------------------------------------------------------------- kNN

@torch.no_grad()
def extract_features(encoder, loader, device, dtype=torch.float32, layers=1):
    """Average-pooled encoder features: (n, D) float32 and labels (n,). With layers=K the last K blocks' outputs,
    each through the encoder's final LayerNorm (as the last one is) and pooled, concatenated: (n, K D), the
    paper's probe on the last four (Appendix C; facebookresearch/ijepa issue 47 measured 77% -> 80.8% with it)."""
    encoder.eval()
    feats, labels, outs = [], [], []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in encoder.blocks[-layers:]
             ] if layers > 1 else []
    try:
        for x, y in loader:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                z = encoder(x.to(device, non_blocking=True)).mean(dim=1)  # (B, N, D) -> (B, D)
                if layers > 1:  # (B, K D)
                    z = torch.cat([encoder.norm(o).mean(dim=1) for o in outs], dim=1)
            outs.clear()
            feats.append(z.float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(feats), torch.cat(labels)


def check_finite(*features):
    """Features with NaN or inf (a diverged encoder) would score as if they meant something: refuse them."""
    for x in features:
        if not torch.isfinite(x).all():
            raise SystemExit(f"error: {int((~torch.isfinite(x)).any(1).sum())} of {len(x)} feature rows are "
                             "non-finite (NaN or inf): the encoder's weights or its inputs are broken")


def knn_classify(bank, bank_labels, queries, query_labels, k=20, temperature=0.07, chunk=1024):
    """Weighted kNN top-1 / top-5 accuracy in percent of L2-normalised features. Queries go in chunks of
    `chunk`, so memory is (chunk x bank size) whatever the number of queries."""
    check_finite(bank, queries)
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
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


def knn_evaluate(encoder, bank_set, query_set, device, dtype=torch.float32, workers=0, k=20, temperature=0.07,
                 probe=False):
    """The function train.py calls: features of both data sets, then weighted kNN -> (top1, top5), and with probe
    the linear probe's top-1 on the same features third (train.py --probe)."""
    (bank, bank_labels), (queries, query_labels) = (
        extract_features(encoder, torch.utils.data.DataLoader(s, batch_size=256, num_workers=workers), device, dtype)
        for s in (bank_set, query_set))
    knn = knn_classify(bank, bank_labels, queries, query_labels, k, temperature)
    return (*knn, linear_probe(bank, bank_labels, queries, query_labels)[0]) if probe else knn


def knn_against_random_init(encoder, config, bank_set, query_set, device, dtype=torch.float32, workers=0, seed=0):
    """The end of a training run (train.py): kNN top-1 of the trained encoder and of a random-init one of the same
    shape (`config`, seeded by `seed`), which every accuracy should stand beside -> (trained, random)."""
    torch.manual_seed(seed)
    trained = knn_evaluate(encoder, bank_set, query_set, device, dtype, workers)[0]  # the random init draws after
    return trained, knn_evaluate(models.VisionTransformer(**config).to(device), bank_set, query_set, device, dtype,
                                 workers)[0]


# --------------------------------------------------------------------------------------- linear probe

STRENGTHS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # L2 weights tried, strongest first (ties go to the stronger)


def fit_logistic(x, y, l2, num_classes, iters=200):
    """Multinomial logistic regression on x (n, D) float64 by full-batch L-BFGS -> (W (D, C), b (C,)).
    Minimises mean cross-entropy + l2 * |W|^2; starts from zero, so it is deterministic."""
    W = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def holdout_split(n, fraction=0.2, seed=0):
    """A seeded split of n training rows -> (fit rows, holdout rows); validation rows never enter."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(n * fraction))
    return perm[cut:], perm[:cut]


def linear_probe(train_x, train_y, val_x, val_y, strengths=STRENGTHS, seed=0):
    """Top-1 (%) on the validation rows of a linear classifier on frozen features, and its L2 strength.

    The strength is chosen on a seeded 20% holdout of the training rows, then the classifier is refit on
    all of them. Features are standardised with training statistics. The paper's probe differs: it trains
    with LARS on augmented crops for many epochs (Appendix C); this one sees each image once, un-augmented,
    which is cheaper and deterministic and usually scores somewhat lower."""
    check_finite(train_x, val_x)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    X, Xv = ((train_x - mean) / std).double(), ((val_x - mean) / std).double()
    fit, held = holdout_split(len(X), seed=seed)
    C = int(train_y.max()) + 1

    def top1(W, b, x, y):
        return 100.0 * ((x @ W + b).argmax(1) == y).double().mean().item()

    scores = [top1(*fit_logistic(X[fit], train_y[fit], l2, C), X[held], train_y[held]) for l2 in strengths]
    best = strengths[scores.index(max(scores))]
    return top1(*fit_logistic(X, train_y, best, C), Xv, val_y), best


class Pixels(torch.nn.Module):
    """The raw-pixel control: each image flattened, as a one-token 'encoder output' (B, 1, 3 H W)."""

    def forward(self, x):
        return x.flatten(1).unsqueeze(1)


def evaluate(encoder, loaders, device, args):
    """kNN and (unless --no-linear) the probe of one encoder -> {knn_top1, knn_top5, linear_top1, linear_l2}."""
    layers = args.layers if hasattr(encoder, "blocks") else 1  # the raw pixels have one "layer"
    (bank, bank_y), (queries, query_y) = (extract_features(encoder.to(device), loader, device, layers=layers)
                                          for loader in loaders)
    result = dict(zip(("knn_top1", "knn_top5"), knn_classify(bank, bank_y, queries, query_y, args.k, args.temperature)))
    if not args.no_linear:
        result["linear_top1"], result["linear_l2"] = linear_probe(bank, bank_y, queries, query_y, seed=args.seed)
    return result


def main(argv=None):
    from data import CenterCrop, ImageFolder, make_datasets  # the CLI's images only: kNN and the probe need torch alone

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="our latest.pt / best.pt, an official .pth.tar, a transformers IJepaModel folder "
                   "or a timm vit_*_gap state dict")
    p.add_argument("--data", required=True, help="'demo', or ROOT with train/ (bank, probe fit) and val/ (scored)")
    p.add_argument("--which", choices=["target", "context"], default="target",
                   help="which encoder: the paper evaluates the target (EMA) encoder")
    p.add_argument("--random-init", action="store_true", help="evaluate an untrained encoder: the control")
    p.add_argument("--model", default="vit_tiny", help="with --random-init (or to force an official file's shape)")
    p.add_argument("--depth", type=int, default=None,
                   help="with --random-init: encoder depth if not the model's (as train.py --depth)")
    p.add_argument("--patch-size", type=int, default=None, help="with --random-init (default 16) or an official file")
    p.add_argument("--img-size", type=int, default=None, help="evaluation size (default: the size trained at)")
    p.add_argument("--layers", type=int, default=1, metavar="K", help="features: the last K blocks' pooled outputs "
                   "concatenated (the paper's probe: 4); 1 is the encoder's output")
    p.add_argument("--k", type=int, default=20, help="neighbours; 20 as DINO, which found 10-20 best on ImageNet")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim/T); 0.07 as DINO")
    p.add_argument("--grayscale", action="store_true",
                   help="bank and queries in grayscale: a diagnostic of how much of the score is colour")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass; memory only")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes for decoding")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init control and the probe's holdout")
    p.add_argument("--controls", action="store_true",
                   help="also score a random-init encoder of the same shape and the raw pixels, by kNN and probe")
    p.add_argument("--no-linear", action="store_true", help="kNN only (the full-batch probe is for up to ~100k images)")
    args = p.parse_args(argv)
    if args.random_init:
        if args.model not in models.VIT_CONFIGS:
            raise SystemExit(f"error: unknown --model {args.model}: choose from {', '.join(models.VIT_CONFIGS)}")
        config = dict(img_size=args.img_size or 224, patch_size=args.patch_size or 16,
                      **models.vit_config(args.model, args.depth))
        torch.manual_seed(args.seed)
        encoder = models.VisionTransformer(**config)
        encoder.config = config
    elif args.ckpt:
        encoder = load_encoder(args.ckpt, args.which, args.patch_size)
    else:
        raise SystemExit("error: give --ckpt PATH or --random-init")
    if not 1 <= args.layers <= len(encoder.blocks):
        raise SystemExit(f"error: --layers {args.layers} must be between 1 and the encoder depth {len(encoder.blocks)}")
    size = args.img_size or encoder.grid[0] * encoder.patch_size
    device = torch.device(args.device)
    if args.data == "demo":  # the built-in textures: the bank of train.py's demo and its held-out queries
        sets = make_datasets("demo", size, args.seed)[1:]
    else:
        sets = [ImageFolder(os.path.join(args.data, s), CenterCrop(size, args.grayscale)) for s in ("train", "val")]
    loaders = [torch.utils.data.DataLoader(s, batch_size=args.batch_size, num_workers=args.workers) for s in sets]
    runs = {"": encoder}
    if args.controls:
        torch.manual_seed(args.seed)
        runs.update(_random=models.VisionTransformer(**encoder.config), _pixels=Pixels())
    summary, where = {}, args.data + (" in grayscale" if args.grayscale else "")
    for suffix, model in runs.items():
        result = evaluate(model, loaders, device, args)
        summary.update({key + suffix: value for key, value in result.items()})
        print(f"{'the encoder' if not suffix else suffix[1:]:>10} on {where}: kNN (k={args.k}, T={args.temperature}) "
              f"top-1 {result['knn_top1']:.2f}% top-5 {result['knn_top5']:.2f}%" + ("" if args.no_linear else
              f"; linear probe top-1 {result['linear_top1']:.2f}% (L2 {result['linear_l2']:g})"), flush=True)
    print("summary: " + " ".join(f"{k}={v:.2f}" if "l2" not in k else f"{k}={v:g}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
