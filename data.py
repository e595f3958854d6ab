"""Images in: the built-in demo data set, ImageFolder trees, the crops, and the sampler that fixes each step's batch.

Everything random here is a pure function of (seed, epoch, index) or (seed, step), never of a global
RNG, so a resumed run sees exactly the images and crops an uninterrupted run would have seen, and N
processes see exactly what one process with N times the batch would. Used by train.py (all of it)
and eval_knn.py (ImageFolder and the centre crop).

    demo = DemoTextures(10_000, img_size=32, seed=0)                  # (3, 32, 32) tensors, labels 0-9
    train = ImageFolder("imagenet/train", RandomResizedCrop(224, seed=0))
    val = ImageFolder("imagenet/val", CenterCrop(224))
"""
import copy
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet, as official
# Image sets whose decoded pixels fit in this many bytes are decoded once and kept in memory (ImageFolder.preload):
# cifar10-mini takes 31 MB; ImageNet-1k (~110 KB a JPEG, ~500 KB decoded) would take ~700 GB.
PRELOAD_LIMIT = 1 << 30
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class DemoTextures(torch.utils.data.Dataset):
    """The built-in demo data: 10 texture classes (stripes at four angles and two periods, checker,
    dots, rings, cross-hatch) drawn procedurally at any size, deterministic in (seed, index). Colours,
    phase, period, a small tilt and pixel noise are random, so neither raw pixels nor a random-init
    encoder (whose pooled features mostly reflect colour) sort them well; the class is the spatial
    pattern, exactly what predicting a masked block's features from its context has to capture."""

    def __init__(self, size, img_size, seed):
        self.size, self.img_size, self.seed = size, img_size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        rng, label, S = np.random.default_rng([self.seed, index]), index % 10, self.img_size
        yy, xx = np.meshgrid(np.arange(S) + 0.5, np.arange(S) + 0.5, indexing="ij")
        period, phase = rng.uniform(5, 8) * S / 32, rng.uniform(0, 2 * np.pi, size=2)

        def wave(angle, p=period):  # a plane wave at angle (degrees, +-8 jitter) and period p pixels
            a = np.deg2rad(angle + rng.uniform(-8, 8))
            return np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / p + phase[0])

        rings = np.hypot(xx - rng.uniform(0, S), yy - rng.uniform(0, S))
        pattern = [wave(0) > 0, wave(90) > 0, wave(45) > 0, wave(135) > 0, (wave(0) > 0) ^ (wave(90) > 0),
                   np.sin(2 * np.pi * xx / period + phase[0]) * np.sin(2 * np.pi * yy / period + phase[1]) > 0.5,
                   np.sin(2 * np.pi * rings / period) > 0, wave(0, 2.2 * period) > 0, wave(90, 2.2 * period) > 0,
                   (wave(45) > 0.3) | (wave(135) > 0.3)][label]
        fg, bg = rng.uniform(0, 1, size=(2, 3))
        bg = np.where(abs(fg - bg).mean() < 0.3, 1 - fg, bg)  # keep the pattern visible
        img = np.where(pattern[..., None], fg, bg) + rng.normal(0, 0.05, size=(S, S, 3))
        x = torch.from_numpy(np.clip(img, 0, 1)).permute(2, 0, 1).float()
        return (x - 0.5) / 0.25, label


def to_tensor(img):
    """PIL RGB image -> normalised float tensor (3, H, W)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - MEAN[:, None, None]) / STD[:, None, None]


class RandomResizedCrop:
    """Training crop: random area (scale) and aspect ratio 3/4-4/3, resized to size (official transforms,
    no flip), as a pure function of (seed, epoch, index): a resumed run sees the very same crops."""

    def __init__(self, size, seed, scale=(0.3, 1.0)):
        self.size, self.seed, self.scale = size, seed, scale

    def __call__(self, img, key):
        rng, (W, H) = np.random.default_rng([self.seed, *key]), img.size
        for _ in range(10):
            area = W * H * rng.uniform(*self.scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= W and 0 < h <= H:
                left, top = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
                break
        else:  # fall back to the central square, as torchvision
            w = h = min(W, H)
            left, top = (W - w) // 2, (H - h) // 2
        return to_tensor(img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h)))


class CenterCrop:
    """Evaluation transform: resize the shorter side to `size` (bicubic), then take the central
    size x size square; an image already at that size passes unchanged. With grayscale=True the
    image is first reduced to its luma (PIL's ITU-R 601-2 weights) and copied to all three channels."""

    def __init__(self, size, grayscale=False):
        self.size, self.grayscale = size, grayscale

    def __call__(self, img, key=None):
        if self.grayscale:
            img = img.convert("L").convert("RGB")
        w, h = img.size
        if (w, h) != (self.size, self.size):
            s = self.size / min(w, h)
            w, h = max(self.size, round(w * s)), max(self.size, round(h * s))
            left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.resize((w, h), Image.BICUBIC).crop((left, top, left + self.size, top + self.size))
        return to_tensor(img)


def random_view(imgs, draws, size=None, scale=(0.3, 1.0)):
    """A second view of each image for C-JEPA's invariance term (train.py --invariance): a random crop
    (area `scale` of the training crop, aspect 3/4-4/3), flipped with p=0.5, resized to size x size
    pixels (default: the input's size). On tensors, one bilinear grid_sample for the whole batch, so it
    serves every data set, the demo included. imgs (B, 3, H, W), draws (B, 5) uniforms -> (B, 3, size, size)."""
    B = len(imgs)
    area = scale[0] + (scale[1] - scale[0]) * draws[:, 0]
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * draws[:, 1])
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # crop sides, fractions of the image
    flip = torch.where(draws[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=imgs.device)  # output (x, y) in [-1, 1] -> input coordinates
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, (1 - w) * (2 * draws[:, 2] - 1)
    theta[:, 1, 1], theta[:, 1, 2] = h, (1 - h) * (2 * draws[:, 3] - 1)
    grid = F.affine_grid(theta, [B, 3, size or imgs.shape[-2], size or imgs.shape[-1]], align_corners=False)
    return F.grid_sample(imgs, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class ImageFolder(torch.utils.data.Dataset):
    """ROOT/<class>/<image> tree. Files that are not images, or fail to decode, are skipped with one
    warning line naming each; every image mode (L, RGBA, CMYK, P, ...) is converted to RGB.

    Items are indices or (index, epoch) pairs; transform(img, (epoch, index)) -> tensor, so that
    each random crop is a function of (seed, epoch, index) alone. After `preload()` the images are
    decoded once and kept in memory: the transforms then cut the very same crops from them, without
    decoding every image again every epoch (on a 2-core CPU, decoding 32x32 JPEGs took a fifth to a third
    of a small-preset step's time)."""

    def __init__(self, root, transform):
        if not os.path.isdir(root):
            raise SystemExit(f"error: data folder {root} does not exist")
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        self.root, self.samples, self.transform, self.warned, self.images = root, [], transform, set(), None
        for label, cls in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, cls))):
                for f in sorted(files):
                    path = os.path.join(dirpath, f)
                    if os.path.splitext(f)[1].lower() in IMAGE_EXTS:
                        self.samples.append((path, label))
                    elif not f.startswith("."):
                        self.warn(path, "not an image file")
        if not self.samples:
            raise SystemExit(f"error: no images found under {root} (expected ROOT/<class>/<image>)")
        self.targets = [label for _, label in self.samples]

    def warn(self, path, why):
        if path not in self.warned:
            self.warned.add(path)
            print(f"warning: skipping {path}: {why}", file=sys.stderr, flush=True)

    def decode(self, path):
        """The RGB image at `path`, or None (with a warning) if it does not decode."""
        if path in self.warned:
            return None
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            self.warn(path, f"{type(e).__name__}: {e}")
            return None

    def preload(self, limit_bytes=None):
        """Decode every image once into memory if the decoded set, estimated from the first image's size,
        fits in `limit_bytes` -> whether it did. Larger sets (ImageNet: ~700 GB decoded) keep decoding in
        DataLoader workers, as the official code."""
        limit_bytes = PRELOAD_LIMIT if limit_bytes is None else limit_bytes
        first = next((img for img in map(self.decode, (p for p, _ in self.samples)) if img is not None), None)
        if first is None or first.width * first.height * 3 * len(self.samples) > limit_bytes:
            return False
        self.images = [self.decode(path) for path, _ in self.samples]
        return True

    def with_transform(self, transform):
        """The same images (decoded ones included) under another transform: the kNN bank's centre crops."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def load(self, index):
        """Sample `index`, or the next readable one after it (skipping broken files)."""
        for i in range(len(self.samples)):
            j = (index + i) % len(self.samples)
            img = self.decode(self.samples[j][0]) if self.images is None else self.images[j]
            if img is not None:
                return img, self.samples[j][1]
        raise SystemExit(f"error: no readable image in {self.root}: every file failed to decode")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        img, label = self.load(index)
        return self.transform(img, (epoch, index)), label


class StepBatches(torch.utils.data.Sampler):
    """This rank's share of the global batch of every step from `start` to `total`. Epoch e visits
    the data in the order of a permutation seeded by (seed, e); global batch j of an epoch is slice j
    of it, and rank r takes part r of that slice. So the data seen at a step depends on (seed, step)
    alone: resuming needs no replay, and N processes see exactly what one process with N times the
    batch would. Items are (index, epoch) pairs for the crop seed."""

    def __init__(self, n, batch_size, rank, world, seed, start, total):
        self.n, self.b, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.start, self.total = start, total
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise SystemExit(f"error: {n} images cannot fill one global batch of {batch_size * world}: "
                             "lower --batch-size")

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        for step in range(self.start, self.total):
            epoch, j = divmod(step, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            lo = (j * self.world + self.rank) * self.b
            yield [(i, epoch) for i in perm[lo:lo + self.b].tolist()]


def make_datasets(data, img_size, seed, val_data=None):
    """(train set, kNN bank, kNN queries) for --data: 'demo' or an ImageFolder ROOT (ROOT/train if it
    exists); the bank is the training images centre-cropped. The last two are None without validation data."""
    if data == "demo":
        return (DemoTextures(10_000, img_size, seed=seed), DemoTextures(2_000, img_size, seed=seed),
                DemoTextures(1_000, img_size, seed=10_000 + seed))
    if not os.path.isdir(data):
        raise SystemExit(f"error: --data {data} is not a folder")
    root = os.path.join(data, "train") if os.path.isdir(os.path.join(data, "train")) else data
    train = ImageFolder(root, RandomResizedCrop(img_size, seed))
    train.load(0)  # fails now, in one line, if no file in the folder decodes
    if val_data and not os.path.isdir(val_data):
        raise SystemExit(f"error: --val-data {val_data} is not a folder")
    val_root = val_data or os.path.join(data, "val")
    train.preload()
    if not os.path.isdir(val_root):
        return train, None, None
    val = ImageFolder(val_root, CenterCrop(img_size))
    val.preload()
    return train, train.with_transform(CenterCrop(img_size)), val
