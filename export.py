"""The encoder out to the libraries people already use: Hugging Face transformers and timm.

    python export.py runs/cifar/latest.pt --to hf runs/cifar/hf          # IJepaModel.from_pretrained(DIR)
    python export.py runs/cifar/latest.pt --to timm runs/cifar/timm.pt   # a timm vit_*_gap model's state dict
    python export.py IN1K-vit.h.14-300e.pth.tar --to hf vith14 --which context   # an official file, the same way

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

from eval_knn import encoder_state  # weights_only loading; our checkpoints and official ones

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
