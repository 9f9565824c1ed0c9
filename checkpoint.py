"""
Checkpoint I/O in the tutorial's format, and conversions between attention layouts.

A checkpoint is a torch.save'd dict: "model" (state dict), "optimizer", "model_args",
"config", plus what a resume needs ("iter_num", "best_val_loss", "scaler", "rng",
"loader", "xl_memory" for a TransformerXL run), and "crc32", a checksum of each of these. Reading one is safe with any file:
  - it is data, never code: torch.load(weights_only=True) builds only tensors, dicts, lists
    and plain values, and a plug-in its model_args name (attention="package.module:function")
    is imported only if the user gives the same name on the command line;
  - its sizes are checked against its tensors before a model is built, so a small file
    cannot make us allocate a big model;
  - damage is found: the checksums are verified on every read (a checkpoint without them,
    e.g. the tutorial's own, loads with a note), and each failure is one line naming the file.

    from checkpoint import load_model
    model, ckpt = load_model("out-shakespeare-char/ckpt.pt", "cpu")
"""

import math
import os
import pickle
import re
import sys
import warnings
import zlib
from dataclasses import fields

import torch

from loader import DATA_DIR, dataset_paths
from model import ARCH_KEYS, GPT, MODEL_ARG_KEYS, GPTConfig
from attention import PLAIN_SOFTMAX
from fileio import atomic_torch_save
from outdir import missing_checkpoint
from utils import UserError


_NOTED = set()  # files already reported as having no checksum


# settings of a checkpoint's config that sample.py, eval_kv.py, kv_study.py and a resume read
CONFIG_KINDS = {"dataset": str, "block_size": int, "xl_mem": int, "max_iters": int, "kv_quant": str,
                "kv_quant_group": int, "kv_quant_keys": str, "learning_rate": (int, float), "n_layer": int}


def read_checkpoint(path, option="checkpoint_name"):
    """The checkpoint dict at path (tensors on the CPU), its layout and checksums checked;
    or one clear UserError that names the file (option: the setting that named it; None when
    no setting of the caller does)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder, not a checkpoint file")
        raise missing_checkpoint(path, option or "checkpoint_name")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty (0 bytes), not a checkpoint: {_another(path, option)}")
    try:
        with warnings.catch_warnings():  # torch warns about a raw pickle before it fails: the error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"GLOBAL ([\w.]+)", str(e))  # what the file asked to import
        foreign = _foreign_imports(path) if "Unsupported operand 149" in str(e) else []
        if code or foreign:
            what = code.group(1) if code else foreign[0]
            raise UserError(f"{path} was refused: it asks to load {what}, which is code, not data "
                            "(a checkpoint holds tensors and plain values only); nothing in it was run") from None
        if "Unsupported operand 149" in str(e):  # (149: FRAME, how pickle protocol 4 and later start)
            raise UserError(f"{path} was written with pickle protocol 4 or later, which torch's safe loader cannot "
                            "read: save it again with torch.save's default protocol") from None
        why = str(e).partition("WeightsUnpickler error:")[2] or str(e)  # past torch's generic preamble
        raise UserError(f"{path} is corrupt or not a checkpoint ({_first_line(why)}); "
                        f"{_another(path, option)}") from None
    except Exception as e:  # whatever a damaged file makes the reader raise (KeyError, IndexError, ...)
        raise UserError(f"{path} is corrupt or truncated ({type(e).__name__}: {_first_line(e)}); "
                        f"{_another(path, option)}") from None
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        raise UserError(f"{path} holds weights alone (a state_dict, as torch.save(model.state_dict()) writes), "
                        "without the model_args that say which model they fit; save both (train.py's checkpoints do)")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or \
            not isinstance(ckpt.get("model_args"), dict):
        raise UserError(f"{path} is not a checkpoint of this project (expected a dict with 'model' and 'model_args')")
    if torch.is_tensor(ckpt.get("best_val_loss")) and ckpt["best_val_loss"].numel() == 1 \
            and _dense(ckpt["best_val_loss"]):
        ckpt["best_val_loss"] = ckpt["best_val_loss"].item()  # nanoGPT saves it as a tensor
    for key, kinds in (("config", dict), ("optimizer", dict), ("iter_num", int), ("best_val_loss", (int, float)),
                       ("crc32", dict)):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], kinds):
            raise UserError(f"{path} is corrupt: its {key!r} is a {type(ckpt[key]).__name__}")
    ckpt["config"] = ckpt.get("config") or {}  # absent or None: no settings recorded (readers need not check)
    for key, kinds in CONFIG_KINDS.items():  # the settings other scripts read from it
        value = (ckpt.get("config") or {}).get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)
                                  or kinds is not str and not value >= 0):  # (no setting here is negative, or nan)
            kind = {str: "a string", int: "a whole number >= 0"}.get(kinds, "a number >= 0")
            raise UserError(f"{path} is corrupt: its config says {key}={value!r}, which is not {kind}")
    bad = [k for k, v in ckpt["model"].items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise UserError(f"{path} is corrupt: model entry {bad[0]!r} is not a named tensor")
    odd = next(((k, v) for k, v in ckpt["model"].items() if not _dense(v) or v.dtype not in WEIGHT_DTYPES), None)
    if odd is not None:
        k, v = odd
        what = v.dtype if _dense(v) else f"{v.layout} on {v.device.type}".replace("torch.", "")
        raise UserError(f"{path}: model entry {k!r} is {str(what).replace('torch.', '')}, not a dense tensor of "
                        "float32, float16, bfloat16 or float64, which is what this project saves and loads; "
                        f"{_another(path, option)}")
    sums = ckpt.pop("crc32", None)
    if sums is None:
        if path not in _NOTED:  # the tutorial's checkpoints, and ours from before checksums
            _NOTED.add(path)
            print(f"note: {path} has no checksum (written by another program or an older version); "
                  "it is loaded without a check for damage", file=sys.stderr)
    else:
        gone, added = sorted(set(sums) - set(ckpt)), sorted(set(ckpt) - set(sums))
        changed = [k for k in sorted(ckpt) if k in sums and sums[k] != checksum(ckpt[k])]
        if gone or added or changed:
            what = "; ".join(f"{words} {', '.join(map(str, keys))}" for words, keys in (
                ("missing:", gone), ("added:", added), ("checksum mismatch in", changed)) if keys)
            raise UserError(f"{path} is corrupt ({what}): it changed after it was written; {_another(path, option)}. "
                            "If you edited it yourself, delete its 'crc32' entry (the checksums) when you save it")
    if isinstance(ckpt.get("best_val_loss"), float) and math.isnan(ckpt["best_val_loss"]):
        ckpt["best_val_loss"] = float("inf")  # (no loss is below nan: a resume would never write ckpt.pt)
    return ckpt


def _another(path, option):
    """What to do instead of loading the broken checkpoint at path: the others beside it that
    look whole (a complete zip, as torch.save writes; a truncated one is not), if any."""
    import zipfile
    folder, name = os.path.split(path)
    try:
        others = sorted(n for n in os.listdir(folder or ".") if n.endswith(".pt") and n != name
                        and zipfile.is_zipfile(os.path.join(folder or ".", n)))
    except OSError:
        others = []
    if not others:
        return "use another checkpoint or retrain"
    if option is None:  # no setting of the caller picks a checkpoint (download_pretrained, a study's variant)
        return f"use another checkpoint (beside it: {', '.join(others[:4])}) or retrain"
    pick = others[0] if option.endswith("checkpoint_name") else os.path.join(folder, others[0])  # a name, or a path
    return f"use another checkpoint (beside it: {', '.join(others[:4])}, e.g. --{option}={pick}) or retrain"


def _foreign_imports(path):
    """The names that the pickle in the file at path (a torch zip's data.pkl, or the file
    itself) imports and torch's safe loader does not allow: code, not data. Read, never run;
    [] when it cannot be read as a pickle."""
    import pickletools
    import zipfile
    try:
        from torch._weights_only_unpickler import _get_allowed_globals  # (private: absent, no names)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            with open(path, "rb") as f:
                data = f.read()
        names, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:
        return []
    allowed = _get_allowed_globals()
    return [n for n in names if n not in allowed]


def _first_line(e):
    """The reader's own words, short: its first line, its first sentence if that is long
    (torch's zip reader adds a paragraph of advice that does not apply)."""
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else type(e).__name__
    if len(line) > 100 and ". " in line:
        line = line.split(". ")[0]
    return line[:160]


def checksum(value):
    """CRC-32 of a checkpoint entry, as 8 hex digits: tensors by dtype, shape and bytes,
    containers item by item, plain values by repr. It finds accidental damage (a disk, a
    copy); it is no defence against a forger, who can recompute it."""
    return f"{_crc(value, 0):08x}"


def _crc(value, crc):
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(f"{t.dtype}{tuple(value.shape)}".encode(), crc)
        return zlib.crc32(t.view(torch.uint8).numpy(), crc)
    if isinstance(value, dict):
        for k in sorted(value, key=repr):
            crc = _crc(value[k], zlib.crc32(repr(k).encode(), crc))
        return crc
    if isinstance(value, (list, tuple)):
        crc = zlib.crc32(f"[{len(value)}".encode(), crc)
        for v in value:
            crc = _crc(v, crc)
        return crc
    return zlib.crc32(repr(value).encode(), crc)


_ALLOCATIONS = (torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn)


class _ParametersOnMeta(torch.overrides.TorchFunctionMode):
    """Build a model with its parameters and buffers on the meta device (shapes only, nothing
    allocated), as `with torch.device("meta")` does, but without running the initialisers, and
    with the few tensors made by arange or from values (RoPE's frequencies: half a head) on the
    CPU. torch.device("meta") sends those to the meta device too, where arithmetic and random
    fills run through torch._refs, which imports torch._dynamo the first time (1.3 s, a third
    of a sample.py run)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALLOCATIONS:  # how torch.nn's layers (and RoPE's caches) allocate
            kwargs["device"] = "meta"
        elif getattr(func, "__module__", None) == "torch.nn.init":  # normal_, zeros_, ...: no values to fill
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _dense(t):
    """A tensor with its values in memory (not sparse, not on the meta device)."""
    return t.layout == torch.strided and t.device.type != "meta"


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what a checkpoint's weights may be


def _saved_config(saved, sd, path):
    """The GPTConfig of a checkpoint's model_args, checked against its state dict sd before
    anything is allocated: value types, then width and depth (so a 400 KB file cannot ask
    for a 26 GB model), then every tensor shape, read off a model built on the meta device."""
    missing = [k for k in ARCH_KEYS if k not in saved]
    if missing:  # (GPTConfig's defaults are GPT-2's: the errors below would quote sizes the file never held)
        raise UserError(f"{path} is corrupt: its model_args lack {', '.join(missing)} (they hold "
                        f"{', '.join(sorted(saved)) or 'nothing'}); every checkpoint written by train.py or the "
                        "tutorial has them")
    kinds = {f.name: type(f.default) for f in fields(GPTConfig)}
    for k, v in saved.items():
        if type(v) is not kinds[k] and not (kinds[k] is float and type(v) is int):
            raise UserError(f"{path} is corrupt: model_args {k}={v!r} should be of type {kinds[k].__name__}")
    config = GPTConfig(**saved)
    emb = sd.get("transformer.wte.weight", sd.get("lm_head.weight"))
    vocab = emb.size(0) if emb is not None and emb.dim() == 2 else config.vocab_size
    if "transformer.wpe.weight" in sd or vocab != config.vocab_size:  # nanoGPT's GPT, or one like it
        what = [w for w, there in (("learned positions, transformer.wpe", "transformer.wpe.weight" in sd),
                                   (f"a vocabulary of {vocab} tokens", vocab != config.vocab_size)) if there]
        raise UserError(f"{path} holds another kind of GPT ({'; '.join(what)}), nanoGPT's perhaps: this model reads "
                        f"raw bytes ({config.vocab_size} values) with rotary positions and cannot load it; train one "
                        "here (python train.py config/train_shakespeare_char_cpu.py)")
    layers = {k.split(".")[2] for k in sd if k.startswith("transformer.h.")}
    if emb is None or emb.dim() != 2 or emb.size(1) != config.n_embd or len(layers) != config.n_layer:
        width = emb.size(-1) if emb is not None and emb.dim() else "none"
        raise UserError(f"{path}: model_args n_layer={config.n_layer}, n_embd={config.n_embd} do not fit its "
                        f"weights ({len(layers)} layers, width {width}); the file is corrupt")
    # a plug-in's name does not change any shape: build with softmax, importing nothing
    plain = GPTConfig(**dict(saved, attention="softmax")) if ":" in config.attention else config
    try:
        with _ParametersOnMeta():
            expected = {k: tuple(v.shape) for k, v in GPT(plain).state_dict().items()}
    except (UserError, ValueError) as e:  # (ValueError: torch's own checks, e.g. a dropout of -1)
        raise UserError(f"{path}: its model_args describe no model this code can build ({e})") from None
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or [k for k in sorted(got) if got[k] != expected[k]]
        k = diff[0]
        raise UserError(f"{path}: weights do not fit model_args {saved} ({k}: {got.get(k, 'missing')} in the "
                        f"file, {expected.get(k, 'none')} expected); the file is corrupt or its settings changed")
    return config


def _check_plugins(args, overrides, path):
    """A plug-in name in a checkpoint is data: it is imported only if the user gave the same."""
    for k, v in args.items():
        if isinstance(v, str) and ":" in v and (overrides or {}).get(k) != v:
            plain = " (or --attention=softmax to run it with plain softmax instead)" if k == "attention" else ""
            raise UserError(f"{path} names the plug-in {k}={v!r}; code named by a checkpoint is not "
                            f"imported unless you ask: add --{k}={v} if you trust that module{plain}")


def saved_dataset_paths(name, path):
    """loader.dataset_paths for the dataset named by the config of the checkpoint at path:
    data, not the user's word, so a folder path is only read (never prepared, nothing is
    written there); a name must be a dataset under the project's data/ folder."""
    data = os.path.realpath(DATA_DIR)
    if not isinstance(name, str) or not name:
        raise UserError(f"{path} does not say which dataset it was trained on; pass --dataset=NAME (or a folder)")
    if os.sep in name or "/" in name:
        train, val = os.path.join(name, "train.txt"), os.path.join(name, "val.txt")
        if not (os.path.isfile(train) and os.path.isfile(val)):
            raise UserError(f"{path} was trained on {name}, which holds no train.txt and val.txt; a folder named by "
                            "a checkpoint is only read: pass --dataset=NAME or --dataset=FOLDER to name one yourself")
        return train, val
    if not os.path.realpath(os.path.join(data, name)).startswith(data + os.sep):
        raise UserError(f"{path} names the dataset {name!r}, which is not a folder under data/; pass --dataset=NAME")
    return dataset_paths(name)


def _strip_prefixes(state_dict):
    """Keys without the wrappers' prefixes, in any order and number (torch.compile's
    `_orig_mod.`, DDP's `module.`: DDP(torch.compile(m)) saves `module._orig_mod.`)."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("_orig_mod.", "module.")):
            k = k.split(".", 1)[1]
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


def load_model(path, device="cpu", overrides=None, option="checkpoint_name"):
    """Build the model a checkpoint describes and load its weights strictly.

    overrides: model args to change (attention kind, n_kv_head, window, ...); the
    architecture keys n_layer, n_head, n_embd, bias always come from the checkpoint. A
    plug-in the checkpoint names runs only if overrides names it too (_check_plugins).
    A smaller n_kv_head or another kv_share converts the weights (see convert_state_dict).
    Returns (model, checkpoint dict); checkpoint["conversions"] lists what was converted.
    option: the setting that named the file, for the error when it is not there."""
    ckpt = read_checkpoint(path, option)
    sd = _strip_prefixes(ckpt["model"])
    saved = {k: v for k, v in ckpt["model_args"].items() if k in MODEL_ARG_KEYS}
    old = _saved_config(saved, sd, path)
    args = dict(saved)
    args.update({k: v for k, v in (overrides or {}).items() if k in MODEL_ARG_KEYS and k not in ARCH_KEYS})
    _check_plugins(args, overrides, path)
    given = (overrides or {}).get("attention")
    if saved.get("attention") == "linear" and saved.get("linear_layers") and given not in (None, "linear"):
        raise UserError(f"--attention={given}: {path} mixes linear attention (layers {saved['linear_layers']}) with "
                        f"softmax in the others, which --attention={given} would replace in every layer; drop it")
    new = GPTConfig(**args)
    broken = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if broken is not None:
        raise UserError(f"{path} holds weights that are not finite numbers (nan or inf in {broken}): its run diverged; "
                        "use an earlier checkpoint, or retrain with a lower learning_rate")
    sd, notes = convert_state_dict(sd, old, new)
    model = GPT(new)  # (a plug-in attention is imported and checked here: its errors come before the note)
    if old.attention != new.attention and not {old.attention, new.attention} <= set(PLAIN_SOFTMAX):
        expect = ("expect noise until it is fine-tuned" if "linear" in (old.attention, new.attention) else
                  "its text and losses change unless the two compute the same function")
        print(f"note: {path} was trained with attention={old.attention}; run as attention={new.attention}, its "
              f"weights compute something else ({expect})", file=sys.stderr)
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
    ckpt["crc32"] = {k: checksum(v) for k, v in ckpt.items()}  # read_checkpoint verifies them
    try:
        atomic_torch_save(ckpt, path)
    except OSError as e:  # a full disk, a folder gone read-only: the previous file is intact
        kept = f"the previous {os.path.basename(path)} is intact; " if os.path.exists(path) else ""
        raise UserError(f"could not write {path} ({e.strerror or e}); {kept}free some space or use another "
                        "--out_dir, then continue with --init_from=resume --resume_checkpoint_name=last") from None
