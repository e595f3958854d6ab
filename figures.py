"""The README's pictures, drawn from real masks and from the runs' own log.csv files.

    python figures.py --image ../shared/data/cifar10-mini/val/horse/0002.jpg   # all three PNGs into figures/
    python figures.py --study runs/study --small runs/small-knn    # from fresh runs instead of the logs kept here

masks.png: masks.sample_masks over a demo image, at the ImageNet grid (14 x 14) and the demo's (8 x 8).
study.png: the stability study (RESULTS.md, study.sh): kNN, effective rank and feature std against steps, a
line per configuration, from OUT/log.csv of each run; its table and rank correlations are printed.
small.png: the small-data preset's kNN against training minutes, with random init and raw pixels as flat
references. matplotlib is needed here only.
"""
import argparse
import csv
import glob
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from PIL import Image  # noqa: E402

import models  # noqa: E402
from data import MEAN, STD, CenterCrop, DemoTextures, ImageFolder, to_tensor  # noqa: E402
from masks import sample_masks  # noqa: E402
from monitor import collapse_suspected  # noqa: E402
from monitor import Monitor  # noqa: E402  (the rule itself, not a copy of it)

HERE = os.path.dirname(os.path.abspath(__file__))
# References for small.png, measured on the same validation images (RESULTS.md gives the commands):
RANDOM_INIT, RAW_PIXELS = 26.15, 39.10  # random-init 4-deep ViT-Tiny/4 (seed 0), flattened 32 x 32 pixels
SMALL_IMG_PER_S = 422  # the small preset alone on the 2-core AVX-512 CPU (RESULTS.md): steps -> minutes


def find_logs(folder):
    """FOLDER/*/log.csv, one per run, or a one-line error."""
    runs = sorted(glob.glob(os.path.join(folder, "*", "log.csv")))
    if not runs:
        raise SystemExit(f"error: no */log.csv under {folder}")
    return runs


def read_log(path):
    """OUT/log.csv -> {column: [floats]} (an empty kNN cell is None); the "# ..." lines (the machine) are skipped."""
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    return {k: [float(r[k]) if r[k] else None for r in rows] for k in rows[0]}


def read_summary(path):
    """{key: float} from the last "summary: k=v ..." line of a file (train.py's NAME.summary or eval_knn.py's
    NAME.eval), or {} if there is no such file or line."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        found = [line for line in f if line.startswith("summary:")]
    pairs = [kv.split("=", 1) for kv in found[-1].split()[1:]] if found else []
    return {k: float(v) for k, v in pairs if number(v)}  # the machine's words (torch=2.13.0+cpu ...) left out


def number(text):
    """Whether text reads as a float."""
    try:
        float(text)
        return True
    except ValueError:
        return False


# A re-run's columns that may differ from the committed log's: the speed of the machine it ran on, and the
# effective rank by up to this much (LAPACK's SVD rounds differently on another CPU kind: ~1e-7 measured)
REPLAY_SKIP, REPLAY_TOLERANCE = ("img_per_s",), {"eff_rank": 1e-6}


def compare_logs(rerun, committed, upto=None):
    """A re-run's OUT/log.csv against a committed one, at every step the committed log has (up to `upto`), in every
    column it has but REPLAY_SKIP: equal as written (a float's shortest repr), eff_rank within its tolerance
    -> (rows compared, columns compared, the differences [(step, column, committed, re-run)])."""
    old, new = ({int(r["step"]): r for r in csv.DictReader(line for line in open(path) if not line.startswith("#"))}
                for path in (committed, rerun))
    steps = [s for s in old if upto is None or s <= upto]
    columns = [c for c in next(iter(old.values())) if c not in REPLAY_SKIP]
    differ = []
    for s in steps:
        for c in columns:
            a, b = old[s][c], new.get(s, {}).get(c, "(missing)")
            close = c in REPLAY_TOLERANCE and a and number(b) and abs(float(a) - float(b)) <= REPLAY_TOLERANCE[c]
            if a != b and not close:
                differ.append((s, c, a, b))
    return len(steps), len(columns), differ


def draw_masks(path, image=None, seed=3):
    """Context and the four target blocks over one image (a demo texture unless `image` is a file), at
    both grids; one row a grid."""
    fig, axes = plt.subplots(2, 6, figsize=(12, 4.9))
    for row, (img_size, patch) in enumerate([(224, 16), (32, 4)]):
        if image:
            with Image.open(image) as im:
                img = to_tensor(im.convert("RGB").resize((img_size, img_size), Image.BICUBIC))
            img = (img * STD[:, None, None] + MEAN[:, None, None]).clamp(0, 1)  # (3, S, S) in [0, 1]
        else:
            img = (DemoTextures(10, img_size, seed=seed)[2][0] * 0.25 + 0.5).clamp(0, 1)  # (3, S, S) in [0, 1]
        grid = img_size // patch
        ctx, tgt = sample_masks(1, grid, generator=torch.Generator().manual_seed(seed))
        cells = [("image", None), ("context", ctx[0])] + [(f"target {i + 1}", tgt[0, i]) for i in range(tgt.shape[1])]
        for ax, (title, kept) in zip(axes[row], cells):
            shown = img.clone()
            if kept is not None:  # grey out every patch the encoder (or this target block) does not cover
                on = torch.zeros(grid * grid, dtype=torch.bool)
                on[kept] = True
                on = on.reshape(grid, grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
                shown = torch.where(on, shown, 0.5 + 0.15 * (shown - 0.5))
            ax.imshow(shown.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            label = f"{title} ({len(kept)} patches)" if kept is not None else f"{img_size} px, {grid}x{grid} patches"
            ax.set_title(label, fontsize=9)
    fig.suptitle("I-JEPA masks (masks.sample_masks, default settings): the context never contains a target patch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def study_runs(folder):
    """{name: log} for FOLDER/*/log.csv; SALT's stage 2 (row "...salt-2") is shifted by the steps of the same
    seed's stage 1 ("...salt-1"), so both stages together sit on the budget's step axis."""
    logs = {os.path.basename(os.path.dirname(run)): read_log(run) for run in find_logs(folder)}
    for name, log in logs.items():
        row, suffix = split_seed(name)
        first = logs.get(row[:-1] + "1" + suffix) if row.endswith("salt-2") else None
        if first:
            log["step"] = [s + first["step"][-1] for s in log["step"]]
    return logs


# the rows that act on the monitor: a row of the study, with --lower-reg or --early-stop
RULES = ("-lower", "-early-stop")
# The study's panels: a row goes to the first panel whose keywords its name holds (the small preset's rows to
# the fifth, the rule's rows to the last); plain, the reference, is drawn in each.
PANELS = [("the guards: stop-gradient, slow target", ("target-shared", "ema", "frozen", "salt")),
          ("SIGReg: weights, projector, with and without the guards", ("sigreg",)),
          ("VICReg, the pixel loss, loss kinds, targets", ("vicreg", "loss-", "norm-none", "rgb-aux")),
          ("masks and predictor", ("vjepa", "targets-", "context-", "pred-")),
          ("the recipes: the small preset", ("small",)),
          ("acting on the monitor (thin: the same row without the rule)", RULES)]


def panel_of(row):
    """The index in PANELS of a study row (None for plain and for a row no keyword names)."""
    if row.endswith(RULES):
        return len(PANELS) - 1
    if row.startswith("small"):
        return len(PANELS) - 2
    return next((i for i, (_, keys) in enumerate(PANELS) if any(k in row for k in keys)), None)


def base_of(row, rows, ref="plain"):
    """The row a study row is judged against: the same row without the rule for a rule's row (`-lower`,
    `-early-stop`), the small preset for a departure from it, else the reference."""
    for suffix in RULES:
        if row.endswith(suffix) and row.removesuffix(suffix) in rows:
            return row.removesuffix(suffix)
    return "small" if row.startswith("small-") and "small" in rows else ref


def mean_band(logs, key):
    """Seeds of one row -> (steps, mean, min, max) of column `key` at the steps every seed logged it."""
    per_run = [{s: v for s, v in zip(log["step"], log[key]) if v is not None} for log in logs]
    steps = sorted(set.intersection(*(set(r) for r in per_run)))
    values = [[r[s] for r in per_run] for s in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def draw_study(folder, logs, path):
    """kNN against steps in six panels of related rows, each row's mean over its seeds with the min-max band,
    and a seventh panel with every row's effective rank (logs: study_runs(folder))."""
    fig, axes = plt.subplots(2, 4, figsize=(20, 9.5))
    for ax in axes.flat[1:7]:  # the panels over steps share them; the eighth has its own axis
        ax.sharex(axes.flat[0])
    for ax in axes[0]:
        ax.tick_params(labelbottom=False)
    groups = seed_groups(logs)
    summaries = glob.glob(os.path.join(folder, "*.summary"))
    random_init = read_summary(summaries[0]).get("knn_top1_random") if summaries else None
    colours = plt.get_cmap("tab10").colors
    for p, (ax, (title, _)) in enumerate(zip(axes.flat, PANELS)):
        rows = ["plain"] * ("plain" in groups) + [r for r in groups if panel_of(r) == p]
        for i, row in enumerate(rows):
            steps, mean, lo, hi = mean_band([logs[run] for run in groups[row]], "knn_top1")
            style = dict(color="black" if row == "plain" else colours[i % 10], lw=2.2 if row == "plain" else 1.3,
                         ls="--" if any(k in row for k in ("shared", "ema-0")) else "-")
            ax.plot(steps, mean, marker="o", ms=2.5, label=f"{row} ({len(groups[row])})", **style)
            base = base_of(row, groups)
            if p == len(PANELS) - 1 and base != "plain":  # the rule's row beside the same row without it
                ax.plot(*mean_band([logs[run] for run in groups[base]], "knn_top1")[:2], color=style["color"], lw=0.7)
            if len(groups[row]) > 1:
                ax.fill_between(steps, lo, hi, color=style["color"], alpha=0.15, lw=0)
        if random_init:
            ax.axhline(random_init, color="gray", ls=":", lw=1)
        ax.axhline(RAW_PIXELS, color="gray", ls="-.", lw=1)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_ylabel("kNN top-1 (%) on val")
    draw_label_free(axes.flat[7], folder, logs)
    ax = axes.flat[6]
    for row, runs in groups.items():
        steps, mean, _, _ = mean_band([logs[run] for run in runs], "eff_rank")
        ax.plot(steps, mean, lw=2.2 if row == "plain" else 0.9, color="black" if row == "plain" else None)
    ax.set_yscale("log")
    ax.set_title("effective rank of pooled target features, every row (plain in black)", fontsize=10)
    for ax in axes[1][:3]:
        ax.set_xlabel("step")
    fig.suptitle("Mechanisms on and off, cifar10-mini, 4-deep ViT-Tiny/4, 3,900 steps of 64: mean over seeds "
                 "(in brackets), band = min-max; dotted: random init, dash-dot: raw pixels; dashed: no slow target",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)


def draw_label_free(ax, folder, logs):
    """The panel of answer 8: LiDAR and RankMe of each run that logged them, at its last evaluation, against
    eval_knn.py's probe of the run, with their rank correlations."""
    scores = {n: read_summary(os.path.join(folder, f"{n}.eval")) for n, log in logs.items()
              if log.get("lidar") and log["lidar"][-1] is not None}
    points = [(logs[n]["lidar"][-1], logs[n]["rankme"][-1], s["linear_top1"], collapsed(logs[n]))
              for n, s in scores.items() if "linear_top1" in s]
    if len(points) < 3:
        return ax.axis("off")
    lidar, rankme, probe, alarm = zip(*points)
    ax.scatter(lidar, probe, s=16, label=f"LiDAR (Spearman {spearman(lidar, probe):+.2f})")
    ax.scatter(rankme, probe, s=16, facecolors="none", edgecolors="C3",
               label=f"RankMe ({spearman(rankme, probe):+.2f})")
    ax.scatter([v for v, a in zip(lidar, alarm) if a], [v for v, a in zip(probe, alarm) if a], s=70, marker="x",
               color="black", lw=1, label="collapsed (the alarm at the end)")
    ax.set_xlabel("effective rank at the last evaluation (no labels)")
    ax.set_ylabel("linear probe (%) on val")
    ax.set_title(f"quality without labels against the probe, {len(points)} runs", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


def spearman(a, b):
    """Rank correlation of two equal-length lists (no ties expected in measured floats); nan under 3."""
    if len(a) < 3:
        return math.nan
    ra, rb = (torch.tensor(x, dtype=torch.float64).argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def study_table(folder, logs):
    """The study as markdown rows (last logged loss, std, rank and SIGReg statistic; last and best in-run
    kNN; eval_knn.py's float32 kNN and linear probe where FOLDER/NAME.eval holds them; * marks a frozen
    target, whose monitor columns are the teacher's, not the evaluated student's), then the rank
    correlation across runs of the final loss and of the SIGReg statistic with final kNN: over every run,
    and over the plain-base runs whose loss is plain I-JEPA's (smooth L1, no added term) so on one scale."""
    rows = ["| run | loss | std | eff. rank | SIGReg stat. | kNN at end | best kNN (step) | eval kNN | probe |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    finals = {}
    missing = lambda v, fmt, unit="": "-" if math.isnan(v) else format(v, fmt) + unit  # not logged / evaluated
    for name, log in logs.items():
        knn = [(k, s) for s, k in zip(log["step"], log["knn_top1"]) if k is not None]
        last = {k: log.get(k, [math.nan])[-1] for k in ("loss", "std_mean", "eff_rank", "sigreg")}
        ev = read_summary(os.path.join(folder, f"{name}.eval"))  # eval_knn.py's output, if kept
        best = max(knn, key=lambda ks: (ks[0], -ks[1]))  # a tie: the first
        row = split_seed(name)[0]
        frozen = "frozen" in row or row.endswith("salt-2")  # std, rank, SIGReg: the frozen teacher's
        rows.append(f"| {name} | {last['loss']:.3g} | {last['std_mean']:.3f}{'*' * frozen} | "
                    f"{last['eff_rank']:.2f} | {missing(last['sigreg'], '.1f')} | {knn[-1][0]:.2f}% | "
                    f"{best[0]:.2f}% ({best[1]:.0f}) | {missing(ev.get('knn_top1', math.nan), '.2f', '%')} | "
                    f"{missing(ev.get('linear_top1', math.nan), '.2f', '%')} |")
        # SALT is one run: its stage 2 ends it; the rule's rows are left out, a rule that never fires repeats its row
        if not row.endswith(("salt-1", *RULES)):
            finals[name] = (last["loss"], math.nan if frozen else last["sigreg"], knn[-1][0])
    one_scale = [n for n in finals if n.startswith("plain") and not any(
        w in n for w in ("sigreg", "vicreg", "loss-", "vjepa", "norm-none", "rgb-aux"))]
    for title, names in [("every run", list(finals)), ("plain-base runs with plain I-JEPA's loss", one_scale)]:
        loss, stat, knn = zip(*(finals[n] for n in names))
        logged = [(s, k) for s, k in zip(stat, knn) if not math.isnan(s)]  # no column in older logs; frozen targets
        rho = spearman(*zip(*logged)) if logged else math.nan
        rows.append(f"\nSpearman rank correlation with final kNN, {title}: final loss {spearman(loss, knn):+.2f} "
                    f"over {len(names)} runs, SIGReg statistic {rho:+.2f} over {len(logged)}")
    return "\n".join(rows)


def split_seed(name):
    """A run's (row, seed suffix): seed 0 of row NAME runs as NAME, seed S as NAME-sS (study.sh SEEDS)."""
    base, _, seed = name.rpartition("-s")
    return (base, "-s" + seed) if base and seed.isdigit() else (name, "")


def seed_groups(names):
    """{row: [run names]} over the runs' seeds."""
    groups = {}
    for name in names:
        groups.setdefault(split_seed(name)[0], []).append(name)
    return groups


def against(row, ref):
    """The study's rule for a difference (RESULTS.md): "above", "below" or "within" for the per-seed scores of
    a row against a reference row's. Both with several seeds: their min-max ranges do not overlap. One of them
    with a single seed: it lies outside the other's range by more than that range's width (the one-seed row's
    own spread is unknown, so the other's stands in for it). Both single: "?", the rule cannot tell."""
    if len(row) == 1 and len(ref) == 1:
        return "?"
    if len(ref) == 1:  # the single seed is the reference: judge it against the row, then turn the answer round
        return {"above": "below", "below": "above"}.get(against(ref, row), "within")
    lo, hi = min(ref), max(ref)
    margin = hi - lo if len(row) == 1 else 0.0
    return "above" if min(row) > hi + margin else "below" if max(row) < lo - margin else "within"


def seed_table(folder, names, ref="plain"):
    """Every scored row: eval_knn.py's kNN and probe as mean (min-max) over its seeds, and where each stands
    against its base by the rule of `against`, kNN and probe judged apart. The base is the reference row, or
    the small preset for a departure from it (`small-vicreg-0` changes one flag of `small`, not of plain), or
    the same row without the rule for a rule's row; a rule's row on another row is also judged against plain."""
    rows = ["| row | seeds | eval kNN, mean (min-max) | probe, mean (min-max) | base | against base: kNN / probe |",
            "| --- | --- | --- | --- | --- | --- |"]
    scores = {}
    for row, runs in seed_groups(names).items():
        if row.endswith("salt-1"):  # SALT's stage 1 is half of one run, scored with its stage 2
            continue
        scored = [read_summary(os.path.join(folder, f"{run}.eval")) for run in runs]
        scores[row] = [[s[key] for s in scored if key in s] for key in ("knn_top1", "linear_top1")]
    for row in sorted(scores, key=lambda r: (r != ref, panel_of(r) if panel_of(r) is not None else len(PANELS), r)):
        knn, probe = scores[row]
        if not knn:
            continue
        cells = [f"{sum(v) / len(v):.2f}" + (f" ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else "") if v else "-"
                 for v in (knn, probe)]
        bases = [base_of(row, scores, ref)] + [ref] * (row.endswith(RULES) and base_of(row, scores, ref) not in
                                                       (ref, "small"))
        verdict = "; ".join(" / ".join(against(v, r) if v and r and row != ref else "-"
                                       for v, r in zip((knn, probe), scores.get(base, ([], [])))) for base in bases)
        rows.append(f"| {row} | {len(knn)} | {cells[0]} | {cells[1]} | {'-' if row == ref else '; '.join(bases)} | "
                    f"{verdict} |")
    return "\n".join(rows)


def replay_early_stop(logs, patience=5, margin=0.5):
    """--early-stop replayed on logged runs, exactly: stopping only cuts a run short, so a run's kNN up to its stop
    is its log's. -> {run: (stop step or None, steps saved, best kNN up to the stop, best kNN of the whole run)}."""
    out = {}
    for name, log in logs.items():
        rule, knn, stop = Monitor(early_stop=patience, early_stop_margin=margin), [
            (s, k) for s, k in zip(log["step"], log["knn_top1"]) if k is not None], None
        for s, k in knn:
            rule.act(s, k)
            if rule.early:
                stop = s
                break
        kept = [k for s, k in knn if stop is None or s <= stop]
        out[name] = (stop and int(stop), int(log["step"][-1] - stop) if stop else 0, max(kept), max(k for _, k in knn))
    return out


def early_stop_table(logs):
    """--early-stop 5 replayed on the study's own runs (SALT's first stages and the rule's rows left out): how many
    would stop, the steps saved, and a row per stopped run."""
    replay = replay_early_stop({n: log for n, log in logs.items() if not split_seed(n)[0].endswith(("salt-1", *RULES))})
    stopped = {n: r for n, r in replay.items() if r[1]}  # a stop at the last evaluation saves nothing
    rows = [f"\n--early-stop 5 replayed on {len(replay)} runs' logs: {len(stopped)} would stop, saving "
            f"{sum(r[1] for r in replay.values())} of {sum(int(logs[n]['step'][-1]) for n in replay)} steps; "
            f"best kNN lost at most {max(r[3] - r[2] for r in replay.values()):.2f} points",
            "| run | stops at step | steps saved | best kNN up to the stop | the whole run's best | kNN at its end |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, (stop, saved, kept, best) in sorted(stopped.items()):
        rows.append(f"| {name} | {stop} | {saved} | {kept:.2f}% | {best:.2f}% | {logs[name]['knn_top1'][-1]:.2f}% |")
    return "\n".join(rows)


def pca_colours(tokens, shown, k=3):
    """Patch features tokens (B, N, D) of many images -> (len(shown), N, k) in [0, 1] for the images `shown` (indices):
    each patch's mean over the B images at its position taken away (what the position alone explains: the sin-cos
    table otherwise fills the first components), then the first k principal components of all the patches, each
    stretched to [0, 1] between its 1st and 99th percentiles."""
    centred = (tokens - tokens.mean(dim=0)).double()  # (B, N, D)
    _, _, v = torch.linalg.svd(centred.flatten(0, 1), full_matrices=False)
    pcs = centred @ v[:k].T  # (B, N, k)
    lo, hi = pcs.flatten(0, 1).quantile(0.01, dim=0), pcs.flatten(0, 1).quantile(0.99, dim=0)
    return ((pcs[shown] - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1).float()


def draw_features(ckpt, folder, path, count=6, seed=0):
    """The first three principal components of the patch features as colours, beside the images: `count` images
    of FOLDER (an ImageFolder, one per class in turn), the trained target encoder of `ckpt` against a random-init
    encoder of the same shape (seeded), each fitted on its own patches."""
    from export import load_encoder
    trained = load_encoder(ckpt).eval()
    torch.manual_seed(seed)
    random = models.VisionTransformer(**trained.config).eval()
    images = ImageFolder(folder, CenterCrop(trained.config["img_size"]))
    picked = list(range(0, len(images), max(len(images) // 256, 1)))
    labels = [images.targets[i] for i in picked]
    shown = [labels.index(c) for c in sorted(set(labels))[:count]]  # the first image of each class
    x = torch.stack([images[i][0] for i in picked])  # (~256, 3, H, W): the images the components are fitted on
    fig, axes = plt.subplots(3, count, figsize=(1.6 * count, 5.2))
    with torch.no_grad():
        rows = [("image", (x[shown] * STD[:, None, None] + MEAN[:, None, None]).clamp(0, 1).permute(0, 2, 3, 1))] + [
            (name, pca_colours(net(x), shown).view(count, *trained.grid, 3))
            for name, net in (("trained", trained), ("random init", random))]
    for r, (name, pictures) in enumerate(rows):
        for c in range(count):
            axes[r, c].imshow(pictures[c].numpy(), interpolation="nearest")
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=9)
    for c in range(count):
        axes[0, c].set_title(images.classes[labels[shown[c]]], fontsize=8)
    fig.suptitle("Patch features less their position's mean, first 3 principal components as RGB", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# Answer 8's statistics: (column, its reading before any run was seen: the evaluation it would pick, as a key
# on the value, largest wins). LiDAR and RankMe: more directions, better; alpha-ReQ: a decay near 1 (its paper's
# best); std: more spread; SIGReg and the loss: lower; token_share: an image's tokens less alike.
STATISTICS = [("lidar", "highest", lambda v: v), ("rankme", "highest", lambda v: v),
              ("alpha_req", "nearest 1", lambda v: -abs(v - 1)), ("std_mean", "highest", lambda v: v),
              ("sigreg", "lowest", lambda v: -v), ("token_share", "lowest", lambda v: -v),
              ("loss", "lowest", lambda v: -v)]


def collapsed(log):
    """Whether the monitor's alarm (monitor.collapse_suspected) calls a logged run collapsed at its last row."""
    first, last = ({k: log[k][i] for k in ("std_mean", "eff_rank")} for i in (0, -1))
    return collapse_suspected({**last, "width": 64}, first)


def label_free_table(folder, logs):
    """Answer 8 as markdown: for each statistic, its rank correlation across runs (its value at the last evaluation)
    with eval_knn.py's final kNN and probe, over every run that logged it and over those not collapsed; and within
    each run, the evaluation it picks (STATISTICS' reading) against the one kNN picks (best.pt's): the points of kNN
    and of the in-run probe lost, mean and worst, and the runs where its pick is within a point of kNN's."""
    runs = {n: log for n, log in logs.items() if "lidar" in log and any(v is not None for v in log["lidar"])}
    rows = ["| statistic | picks | Spearman with kNN / probe, all runs | the same, not collapsed | kNN lost, mean / "
            "worst | probe lost, mean / worst | within a point of kNN's pick |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    scores = {n: read_summary(os.path.join(folder, f"{n}.eval")) for n in runs}
    for column, reading, key in STATISTICS:
        finals, lost = [], []
        for name, log in runs.items():
            evals = [i for i, k in enumerate(log["knn_top1"]) if k is not None]
            picked = max(evals, key=lambda i: key(log[column][i]))
            best = max(evals, key=lambda i: log["knn_top1"][i])  # best.pt's: the first of equal peaks
            lost.append((log["knn_top1"][best] - log["knn_top1"][picked],
                         log["probe_top1"][best] - log["probe_top1"][picked]))
            if "knn_top1" in scores[name]:
                finals.append((log[column][evals[-1]], scores[name]["knn_top1"], scores[name]["linear_top1"],
                               collapsed(log)))
        rho = [spearman([f[0] for f in chosen], [f[i] for f in chosen]) for chosen in
               (finals, [f for f in finals if not f[3]]) for i in (1, 2)]
        knn_lost, probe_lost = zip(*lost)
        rows.append(f"| {column} | {reading} | "
                    f"{rho[0]:+.2f} / {rho[1]:+.2f} ({len(finals)}) | {rho[2]:+.2f} / {rho[3]:+.2f} "
                    f"({sum(not f[3] for f in finals)}) | {sum(knn_lost) / len(lost):.2f} / {max(knn_lost):.2f} | "
                    f"{sum(probe_lost) / len(lost):.2f} / {max(probe_lost):.2f} | {sum(k <= 1 for k in knn_lost)} "
                    f"of {len(lost)} |")
    return "\n".join(rows)


def draw_small(folder, path):
    """kNN of the small preset's runs against minutes of training, with the two flat references."""
    runs = find_logs(folder)
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for run in runs:
        log = read_log(run)
        knn = [(s * 64 / SMALL_IMG_PER_S / 60, k) for s, k in zip(log["step"], log["knn_top1"]) if k is not None]
        ax.plot(*zip(*knn), marker="o", ms=3, label=f"--preset small ({os.path.basename(os.path.dirname(run))})")
    ax.axhline(RAW_PIXELS, color="gray", ls="--", label=f"raw pixels ({RAW_PIXELS}%)")
    ax.axhline(RANDOM_INIT, color="black", ls=":", label=f"random-init encoder ({RANDOM_INIT}%)")
    ax.set_xlabel(f"minutes of training (2-core AVX-512 CPU, bf16, {SMALL_IMG_PER_S} img/s)")
    ax.set_ylabel("kNN top-1 on cifar10-mini val (%)")
    ax.set_title("Small data: kNN during training (k=20, T=0.07)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", default=os.path.join(HERE, "figures", "logs", "study"),
                   help="folder of stability-study runs, one sub-folder with log.csv each")
    p.add_argument("--small", default=os.path.join(HERE, "figures", "logs", "small"),
                   help="folder of small-preset runs made with --knn-every")
    p.add_argument("--image", help="the image under the masks (default: a demo texture)")
    p.add_argument("--out", default=os.path.join(HERE, "figures"), help="where the PNGs go")
    p.add_argument("--compare", nargs=2, metavar=("RERUN", "COMMITTED"),
                   help="instead of drawing: compare a re-run's log.csv with a committed one (study.sh REPLAY=STEP)")
    p.add_argument("--upto", type=int, help="with --compare: the last step compared (a re-run cut short there)")
    p.add_argument("--features", nargs=2, metavar=("CKPT", "FOLDER"),
                   help="also features.png: the patch features of CKPT's target encoder on images of FOLDER as colours")
    args = p.parse_args(argv)
    if args.compare:
        rows, columns, differ = compare_logs(*args.compare, args.upto)
        for step, column, old, new in differ[:20]:
            print(f"step {step} {column}: committed {old}, re-run {new}")
        print(f"replay check {args.compare[0]}: {rows} rows x {columns} columns of {args.compare[1]} (all but "
              f"{', '.join(REPLAY_SKIP)}; eff_rank within 1e-6): " + (f"{len(differ)} differ" if differ else "equal"))
        raise SystemExit(1 if differ or not rows else 0)
    os.makedirs(args.out, exist_ok=True)
    draw_masks(os.path.join(args.out, "masks.png"), args.image)
    study = study_runs(args.study)
    draw_study(args.study, study, os.path.join(args.out, "study.png"))
    draw_small(args.small, os.path.join(args.out, "small.png"))
    print(study_table(args.study, study))
    print(seed_table(args.study, list(study)))
    print(early_stop_table(study))
    print("\nAnswer 8, quality without labels (the runs that logged LiDAR):\n" + label_free_table(args.study, study))
    if args.features:
        draw_features(*args.features, os.path.join(args.out, "features.png"))
    print(f"wrote masks.png, study.png, small.png{', features.png' * bool(args.features)} to {args.out}")


if __name__ == "__main__":
    main()
