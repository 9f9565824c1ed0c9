"""
Checkpoint I/O in the tutorial's format, and conversions between attention layouts.

A checkpoint is a torch.save'd dict: "model" (state dict), "optimizer", "model_args",
"config", plus what a resume needs ("iter_num", "best_val_loss", "scaler", "rng",
"loader"). It holds only tensors, dicts, lists and plain values, so it is read with
torch.load(weights_only=True): a downloaded file cannot run code.

    from checkpoint import load_model
    model, ckpt = load_model("out-shakespeare-char/ckpt.pt", "cpu")
"""

import os
import pickle
import zipfile

import torch

from model import ARCH_KEYS, GPT, MODEL_ARG_KEYS, GPTConfig
from utils import UserError, atomic_torch_save


def checkpoint_path(out_dir, name):
    """out_dir + name, accepting "ckpt", "ckpt.pt", "last", "last.pt"."""
    return os.path.join(out_dir, name if name.endswith(".pt") else name + ".pt")


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict at path, or one clear UserError that names the file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found: train one with `python train.py config/...` "
                        f"(out_dir={os.path.dirname(path) or '.'}) or download the pretrained one (see README)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a plain checkpoint and was refused (weights_only load: {first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is corrupt or truncated ({first[:160]}); use another checkpoint or retrain") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or "model_args" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (expected a dict with 'model' and 'model_args')")
    return ckpt


def _strip_prefixes(state_dict):
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _pool_kv(w, n_embd, old_kv, new_kv, head_dim):
    """c_attn weight/bias rows [q | k (old_kv heads) | v] -> [q | k (new_kv) | v], each new
    K/V head the mean of the old heads of its group (GQA uptraining's mean-pooling)."""
    q, kv = w[:n_embd], w[n_embd:]
    k, v = kv.chunk(2, dim=0)
    g = old_kv // new_kv
    pool = lambda t: t.reshape(new_kv, g, head_dim, *t.shape[1:]).mean(1).reshape(new_kv * head_dim, *t.shape[1:])
    return torch.cat([q, pool(k), pool(v)], dim=0)


def convert_state_dict(sd, old, new):
    """Adapt weights saved for GPTConfig `old` to GPTConfig `new` (same n_layer, n_head,
    n_embd, bias). Returns (state_dict, list of what was converted)."""
    notes = []
    C, hs = new.n_embd, new.head_dim
    names = [n for n in ("weight", "bias") if f"transformer.h.0.attn.c_attn.{n}" in sd]
    key = lambda i, n: f"transformer.h.{i}.attn.c_attn.{n}"
    if new.kv_heads != old.kv_heads:
        if new.kv_heads > old.kv_heads or old.kv_heads % new.kv_heads:
            raise UserError(f"cannot convert n_kv_head {old.kv_heads} -> {new.kv_heads}: the new count must divide the old")
        for i in range(new.n_layer):
            for n in names:
                if sd[key(i, n)].size(0) > C:
                    sd[key(i, n)] = _pool_kv(sd[key(i, n)], C, old.kv_heads, new.kv_heads, hs)
        notes.append(f"n_kv_head {old.kv_heads} -> {new.kv_heads}: each new K/V head is the mean of {old.kv_heads // new.kv_heads} old heads")
    if new.kv_share != old.kv_share:
        kv_of = {}  # the K/V rows each layer used under the old grouping
        for i in range(new.n_layer):
            lead = i - i % old.kv_share
            kv_of[i] = {n: sd[key(lead, n)][C:] for n in names}
        for i in range(new.n_layer):
            for n in names:
                q = sd[key(i, n)][:C]
                if i % new.kv_share == 0:
                    group = range(i, min(i + new.kv_share, new.n_layer))
                    kv = torch.stack([kv_of[j][n] for j in group]).mean(0)
                    sd[key(i, n)] = torch.cat([q, kv])
                else:
                    sd[key(i, n)] = q
        notes.append(f"kv_share {old.kv_share} -> {new.kv_share}: each group's K/V projection is the mean of its layers'")
    return sd, notes


def load_model(path, device="cpu", overrides=None):
    """Build the model a checkpoint describes and load its weights strictly.

    overrides: model args to change (attention kind, n_kv_head, window, ...); the
    architecture keys n_layer, n_head, n_embd, bias always come from the checkpoint.
    A smaller n_kv_head or another kv_share converts the weights (see convert_state_dict).
    Returns (model, checkpoint dict); checkpoint["conversions"] lists what was converted."""
    ckpt = read_checkpoint(path, device)
    saved = {k: v for k, v in ckpt["model_args"].items() if k in MODEL_ARG_KEYS}
    try:
        old = GPTConfig(**saved)
        args = dict(saved)
        args.update({k: v for k, v in (overrides or {}).items() if k in MODEL_ARG_KEYS and k not in ARCH_KEYS})
        new = GPTConfig(**args)
    except TypeError as e:
        raise UserError(f"{path}: unusable model_args ({e})") from None
    sd = _strip_prefixes(ckpt["model"])
    sd, notes = convert_state_dict(sd, old, new)
    model = GPT(new)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{path}: weights do not fit model_args {saved} ({' '.join(first[:2])[:200]})") from None
    ckpt["conversions"] = notes
    return model.to(device), ckpt


def unwrap(model):
    """The plain GPT inside a DistributedDataParallel and/or torch.compile wrapper."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def save_checkpoint(path, model, optimizer, model_args, config, iter_num, best_val_loss,
                    scaler=None, extra=None):
    """Write a checkpoint atomically (a temporary file, then a rename)."""
    ckpt = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "model_args": dict(model_args),
        "config": dict(config),
        "iter_num": int(iter_num),
        "best_val_loss": float(best_val_loss),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }
    ckpt.update(extra or {})
    atomic_torch_save(ckpt, path)


def rng_state():
    """The global RNG states (dropout), for an exact resume."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def restore_training_state(ckpt, mode, optimizer, scaler, loader, shape):
    """Optimizer and scaler state for both modes; RNG and data position for 'continue'
    (loader None: a DDP rank > 0, which keeps its own RNG and rows). shape: this run's
    (batch_size, block_size); the data position is restored only if they are the checkpoint's."""
    if ckpt.get("optimizer") and optimizer_state_fits(optimizer, ckpt["optimizer"]):
        # the moments come from the checkpoint, the hyperparameters from this run's config
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, s in zip(optimizer.param_groups, settings):
            group.update(s)
    else:
        print("note: optimizer state not restored (the parameter shapes changed); starting AdamW afresh")
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if mode != "continue" or loader is None:
        return
    rng = ckpt.get("rng") or {}
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    saved = ckpt.get("config", {})
    same_shape = (saved.get("batch_size"), saved.get("block_size")) == tuple(shape)
    if ckpt.get("loader") and same_shape:
        loader.load_state_dict(ckpt["loader"])
    else:
        print("note: data position not restored (batch_size or block_size changed)")


def optimizer_state_fits(optimizer, state):
    """True if a saved AdamW state matches this optimizer's groups and parameter shapes."""
    groups = optimizer.param_groups
    saved = state.get("param_groups", [])
    if len(saved) != len(groups) or any(len(s["params"]) != len(g["params"]) for s, g in zip(saved, groups)):
        return False
    for s, g in zip(saved, groups):
        for idx, p in zip(s["params"], g["params"]):
            moments = state["state"].get(idx, {})
            if "exp_avg" in moments and moments["exp_avg"].shape != p.shape:
                return False
    return True
