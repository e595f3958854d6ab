"""The encoder's formats, both ways: ours, the official .pth.tar, Hugging Face transformers and timm.

    python export.py runs/cifar/latest.pt --to hf runs/cifar/hf          # IJepaModel.from_pretrained(DIR)
    python export.py runs/cifar/latest.pt --to timm runs/cifar/timm.pt   # a timm vit_*_gap model's state dict
    python export.py IN1K-vit.h.14-300e.pth.tar --to hf vith14 --which context   # an official file, the same way
    encoder = load_encoder("vith14")   # in: any of the four, told apart by what the path holds

`load_encoder` / `encoder_state` read all four back (eval_knn.py --ckpt, train.py --teacher and --init use them),
the architecture read from the weights or the folder's config.json; each format's reader sits beside its writer.

Our weights already carry the official I-JEPA names (models.py), so each library is a renaming away:
  * transformers' IJepaModel (the hub's facebook/ijepa_* files) splits the fused `qkv` projection into
    separate query, key and value layers. We write the names the hub's files use (`encoder.layer.N...`),
    which transformers 4 loads as they are and transformers 5 renames on loading, so one directory serves
    both; and `layer_norm_eps` 1e-6 in config.json, since the library's default of 1e-12 silently changes
    every output. The weights go in a safetensors file written here with torch and json alone.
  * timm's `vit_*_gap` models (no class token, average pooling, the final norm on the tokens) use the same
    names as the official code and ours: the export is the encoder's state dict, plus the create_model line
    that builds a model of the same shape.
Which encoder: the target (EMA) encoder by default, the one the paper evaluates; `--which context` takes the
context encoder, which is what the hub's and timm's official I-JEPA weights are. Neither library is needed
to export; test_all.py checks the mapping with a forward pass written out from the exported weights.
"""
import argparse
import json
import os

import torch

import models
from checkpoint import load_checkpoint  # weights_only: a checkpoint never runs code

# --------------------------------------------------------------------------------------------- in

def encoder_config_from_weights(state, patch_size=None):
    """The architecture of weights that store no config (official, timm), from their shapes."""
    proj = state["patch_embed.proj.weight"]  # (D, 3, p, p)
    dim, depth = proj.shape[0], len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    heads = {c["embed_dim"]: c["num_heads"] for c in models.VIT_CONFIGS.values()}.get(dim)
    if heads is None:
        raise SystemExit(f"error: no official ViT has width {dim}; cannot infer the number of heads")
    patch = patch_size or proj.shape[-1]
    side = int(round(state["pos_embed"].shape[1] ** 0.5))
    return dict(img_size=side * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim)


KINDS = ("our checkpoint (latest.pt, best.pt), an official .pth.tar, a transformers IJepaModel folder "
         "(config.json + model.safetensors) or a timm vit_*_gap state dict (.pt or .safetensors)")


def read_weights(path):
    """What `path` holds, told apart by its content -> (kind, {"target": state, "context": state, "predictor":
    state} with the parts it has, the encoder's config). Ours and the official carry both encoders and the
    predictor; a transformers folder and a timm file carry one encoder, under both names."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        state, config = read_hf(path)
        return "transformers", {"target": state, "context": state}, config
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist")
    ckpt = read_safetensors(path) if path.endswith(".safetensors") else load_checkpoint(path) if os.path.isfile(
        path) else {}
    if "pos_embed" in ckpt and "patch_embed.proj.weight" in ckpt:  # one encoder's tensors under our names
        state, config = read_timm(ckpt)
        return "timm", {"target": state, "context": state}, config
    if "target_encoder" in ckpt or "encoder" in ckpt:  # ours (with its config) or the official (module.-prefixed)
        parts = {which: {k.removeprefix("module."): v for k, v in ckpt[key].items()} for which, key in
                 (("target", "target_encoder"), ("context", "encoder"), ("predictor", "predictor")) if key in ckpt}
        encoder = parts.get("target", parts.get("context"))
        config = ckpt["config"]["encoder"] if "config" in ckpt else encoder_config_from_weights(encoder)
        return "ours" if "config" in ckpt else "official", parts, config
    raise SystemExit(f"error: {path} is none of the kinds read here: {KINDS}")


def encoder_state(path, which="target", patch_size=None):
    """-> (state dict under our names, encoder config) of the `which` encoder (target or context) at `path`."""
    kind, parts, config = read_weights(path)
    if which not in parts:
        raise SystemExit(f"error: {path} ({kind}) has no {which} encoder")
    if patch_size and kind == "official":  # a file that stores no config, read with another patch size
        config = encoder_config_from_weights(parts[which], patch_size)
    return parts[which], config


def load_encoder(path, which="target", patch_size=None):
    """An encoder rebuilt from any of the four kinds (read_weights), in eval mode's absence: a plain module."""
    state, config = encoder_state(path, which, patch_size)
    encoder = models.VisionTransformer(**config)
    encoder.load_state_dict(state)
    encoder.config = config  # so that a random-init control of the same shape can be built
    return encoder


def load_into(path, config, flag, **modules):
    """Pretrained weights of any kind read_weights reads into a freshly built run: each of modules' context,
    target and predictor from the file's part of that name where it has one (an encoder-only file gives its one
    encoder to both; the predictor then starts fresh). A file of another shape than `config` ({"encoder": ...,
    "predictor": ...}) is refused in one line naming `flag` -> what was loaded, in words."""
    kind, parts, found = read_weights(path)
    keys, want = ("patch_size", "embed_dim", "depth", "img_size"), config["encoder"]
    if any(found[k] != want[k] for k in keys):
        raise SystemExit(f"error: {flag} {path} holds a ViT of " + ", ".join(f"{k} {found[k]}" for k in keys) +
                         "; this run builds " + ", ".join(f"{k} {want[k]}" for k in keys) +
                         ": set --model, --depth, --patch-size and --img-size to match")
    loaded = [name for name, module in modules.items() if name in parts]
    for name in loaded:
        try:
            modules[name].load_state_dict(parts[name])
        except RuntimeError:  # the predictor, whose shape the checks above leave out
            raise SystemExit(f"error: {flag} {path} has a {name} of another shape than this run's: set --pred-depth "
                             "and --pred-dim to its own") from None
    return (f"{flag} {path}: {kind} weights; " + ", ".join(loaded) + " loaded" + "; the predictor starts fresh" * (
        "predictor" in modules and "predictor" not in loaded))


# -------------------------------------------------------------------------------------------- out

HF_LAYER = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
            "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}  # ours -> the hub's, per block


def to_hf(state, depth):
    """Our encoder's state dict -> the hub's IJepaModel names, with qkv (3D, D) split by rows into query,
    key and value (our attention reads q, k, v in that order, each head's channels contiguous, as theirs)."""
    out = {"embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for name, chunk in zip(("query", "key", "value"), state[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)):
                out[f"{theirs}attention.attention.{name}.{kind}"] = chunk.contiguous()
            for a, b in HF_LAYER.items():
                out[f"{theirs}{b}.{kind}"] = state[f"{ours}{a}.{kind}"]
    return out


def from_hf(hf, depth):
    """The inverse of to_hf: the hub's names back to ours (query, key and value fused into qkv)."""
    fixed = {"pos_embed": "embeddings.position_embeddings", "norm.weight": "layernorm.weight",
             "norm.bias": "layernorm.bias", "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias"}
    out = {ours: hf[theirs] for ours, theirs in fixed.items()}
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[f"{ours}attn.qkv.{kind}"] = torch.cat([hf[f"{theirs}attention.attention.{n}.{kind}"]
                                                       for n in ("query", "key", "value")])
            for a, b in HF_LAYER.items():
                out[f"{ours}{a}.{kind}"] = hf[f"{theirs}{b}.{kind}"]
    return out


def hf_config(config):
    """config.json of transformers' IJepaModel for our encoder config."""
    return {"architectures": ["IJepaModel"], "model_type": "ijepa", "hidden_size": config["embed_dim"],
            "num_hidden_layers": config["depth"], "num_attention_heads": config["num_heads"],
            "intermediate_size": int(config["embed_dim"] * config.get("mlp_ratio", 4.0)),
            "image_size": config["img_size"], "patch_size": config["patch_size"], "num_channels": 3,
            "hidden_act": "gelu", "qkv_bias": True, "layer_norm_eps": 1e-6,  # ours and the official; not 1e-12
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "torch_dtype": "float32"}


def hf_preprocessor(config):
    """preprocessor_config.json, so that pipeline("image-feature-extraction") resizes and normalises as
    we do (bicubic to the training size; ImageNet mean and std, data.to_tensor)."""
    size = config["img_size"] if isinstance(config["img_size"], int) else config["img_size"][0]
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def read_hf(folder):
    """A transformers IJepaModel folder (config.json and model.safetensors, as the hub's facebook/ijepa_* and
    --to hf write) -> (state under our names, config from config.json)."""
    cfg = json.load(open(os.path.join(folder, "config.json")))
    hf = {k.removeprefix("ijepa."): v for k, v in read_safetensors(os.path.join(folder, "model.safetensors")).items()}
    config = dict(img_size=cfg["image_size"], patch_size=cfg["patch_size"], embed_dim=cfg["hidden_size"],
                  depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                  mlp_ratio=cfg["intermediate_size"] / cfg["hidden_size"])
    try:
        return from_hf(hf, config["depth"]), config
    except KeyError as e:
        raise SystemExit(f"error: {folder}/model.safetensors has no {e} (transformers' IJepaModel names expected)"
                         ) from None


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_safetensors(tensors, path):
    """The safetensors format by hand: an 8-byte little-endian header length, a JSON header of names ->
    dtype, shape and byte offsets, then the raw little-endian bytes of every tensor in that order."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, t in tensors.items():
        blob = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the tensors start 8-byte aligned
    with open(path + ".tmp", "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        f.writelines(blobs)
    os.replace(path + ".tmp", path)


def read_safetensors(path):
    """-> {name: tensor} of a safetensors file (the inverse of write_safetensors)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])
    dtypes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    return {name: torch.frombuffer(body[a:b], dtype=torch.uint8).view(dtypes[meta["dtype"]]).reshape(meta["shape"])
            for name, meta in header.items() if name != "__metadata__" for a, b in [meta["data_offsets"]]}


def read_timm(state):
    """A timm vit_*_gap state dict (the one timm's I-JEPA weights and --to timm hold: our names, no class token)
    -> (state, config read from its shapes)."""
    return dict(state), encoder_config_from_weights(state)


def timm_line(config):
    """The timm.create_model call that builds a vit_*_gap model of this shape, for load_state_dict(strict=True)."""
    return (f'timm.create_model("vit_base_patch16_gap_224", num_classes=0, img_size={config["img_size"]}, '
            f'patch_size={config["patch_size"]}, embed_dim={config["embed_dim"]}, depth={config["depth"]}, '
            f'num_heads={config["num_heads"]}, mlp_ratio={config.get("mlp_ratio", 4.0)!r})')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="our latest.pt / best.pt, or an official .pth.tar")
    p.add_argument("--to", nargs=2, required=True, metavar=("hf|timm", "PATH"),
                   help="hf DIR: a transformers IJepaModel directory; timm FILE: a timm state dict")
    p.add_argument("--which", choices=["target", "context"], default="target",
                   help="the target (EMA) encoder, which the paper evaluates, or the context encoder (the one the "
                        "official hub and timm weights are)")
    args = p.parse_args(argv)
    kind, out = args.to
    if kind not in ("hf", "timm"):
        raise SystemExit(f"error: --to {kind}: choose hf or timm")
    state, config = encoder_state(args.ckpt, args.which)
    files = [os.path.join(out, f) for f in ("config.json", "model.safetensors")] if kind == "hf" else [out]
    if any(os.path.exists(f) for f in files):
        raise SystemExit(f"error: {out} already holds an export: remove it or give another path")
    if kind == "hf":
        os.makedirs(out, exist_ok=True)
        write_safetensors(to_hf(state, config["depth"]), files[1])
        for name, content in (("config.json", hf_config(config)), ("preprocessor_config.json",
                                                                   hf_preprocessor(config))):
            with open(os.path.join(out, name), "w") as f:
                json.dump(content, f, indent=2)
        print(f"wrote the {args.which} encoder of {args.ckpt} to {out}: "
              f"transformers.IJepaModel.from_pretrained({out!r})")
    else:
        torch.save(state, out + ".tmp")
        os.replace(out + ".tmp", out)
        print(f"wrote the {args.which} encoder of {args.ckpt} to {out}: "
              f"model = {timm_line(config)}; model.load_state_dict(torch.load({out!r}))")


if __name__ == "__main__":
    main()
