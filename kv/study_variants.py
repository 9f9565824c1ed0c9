"""
The KV study's variants (kv_study.py): the train.py arguments that turn the base into each
trained reduction, and the checks that run before any work: that the base can be fine-tuned
into each variant, and that --train_args leaves the study's own settings to the study.

    from kv.study_variants import variant_args, check_train_args
    print(variant_args("mqa_share_int2", block=64, n_layer=4, kv_quant_group=32))
    check_train_args("--batch_size=8")
"""
import shlex
from dataclasses import replace
from types import SimpleNamespace

from kv.qat import check_qat
from model import GPTConfig, check_config
from utils import UserError


def variant_table(block, n_layer):
    """{variant: the train.py arguments of its model (None: the base itself, not fine-tuned)}."""
    w = block // 4
    half = ",".join(str(i) for i in range(n_layer // 2, n_layer))  # the upper half stays global
    table = {
        "base": None,
        "base_ft": [],
        "gqa": ["--n_kv_head=2"],
        "mqa": ["--n_kv_head=1"],
        "local": [f"--window={w}", f"--global_layers={half}", "--kv_share=2"],
        "qat_int4": ["--kv_quant=int4"],
        "qat_int2": ["--kv_quant=int2"],
        "mqa_share_int2": ["--n_kv_head=1", "--kv_share=2", "--kv_quant=int2"],
        "mqa_share_int2_local": ["--n_kv_head=1", "--kv_share=2", "--kv_quant=int2", f"--window={w}"],
        "gqa_int2": ["--n_kv_head=2", "--kv_quant=int2"],
        "gqa_int2_local": ["--n_kv_head=2", "--kv_quant=int2", f"--window={max(block // 8, 1)}"],
    }
    return table


def variant_args(name, block, n_layer, kv_quant_group):
    """train.py arguments of a trained reduction (None: the base), its quantization's included."""
    table = variant_table(block, n_layer)
    if name not in table:
        raise UserError(f"unknown variant {name!r}: choose from {', '.join(table)}")
    args = table[name]
    qat = [f"--kv_quant_group={kv_quant_group}", "--kv_quant_keys=token"] if "int" in name else []
    return None if args is None else args + qat


def flags(args):
    """{name: value} of train.py arguments --name=value."""
    return dict(a[2:].split("=", 1) for a in args)


def variant_flags():
    """The train.py settings some variant sets (its quantization's group and keys too)."""
    return {k for args in variant_table(64, 2).values() if args for k in flags(args)} | {"kv_quant_group", "kv_quant_keys"}


def check_variants(todo, base_model, config, base):
    """One UserError, before any work, for a variant train.py would refuse to fine-tune from
    this base (its model settings on the base's, and quantization-aware training where the
    base has XL memory or linear layers), instead of after the fine-tunes before it."""
    c = base_model.config
    for name, args in todo:
        if args is None:
            continue
        given = flags(args)
        try:
            arch = {k: type(getattr(c, k))(v) for k, v in given.items() if k in GPTConfig.__dataclass_fields__}
            variant = replace(c, **arch)
            check_config(variant)
            if given.get("kv_quant", "none") != "none":
                if config.get("xl_mem"):
                    raise UserError(f"quantization-aware training does not combine with the base's XL memory "
                                    f"(xl_mem={config['xl_mem']})")
                check_qat(SimpleNamespace(config=variant), given["kv_quant"], int(given["kv_quant_group"]),
                          given.get("kv_quant_keys") == "channel")
        except UserError as e:
            raise UserError(f"variant {name} cannot be fine-tuned from {base}: {e}; leave it out of --variants") from None


# train.py settings each fine-tune takes from the study (a --train_args value for them would
# train other than the study records): the flag of kv_study.py that sets them, or None
STUDY_SETS = {"max_iters": "--iters", "warmup_iters": "--iters", "lr_decay_iters": "--iters",
              "eval_interval": "--iters", "learning_rate": "--learning_rate", "min_lr": "--min_lr",
              "threads": "--threads", "tensorboard": "--tensorboard", "out_dir": "--out", "init_from": None,
              "resume_mode": None, "dataset": None, "block_size": None, "kv_quant_group": "--kv_quant_group"}


def check_train_args(text):
    """--train_args: --name=value words for train.py, none of them one the study sets itself."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise UserError(f"--train_args={text!r}: {e}; give train.py settings as --name=value separated by spaces")
    for w in words:
        name = w[2:].split("=", 1)[0]
        if not w.startswith("--") or "=" not in w or not name:
            raise UserError(f"--train_args: {w!r} is not --name=value; give train.py settings as --name=value "
                            "separated by spaces, e.g. --train_args='--batch_size=8'")
        if name in variant_flags() - set(STUDY_SETS):
            raise UserError(f"--train_args: --{name} is what the variants change (kv/study_variants.py); "
                            "pick variants with --variants, and give --train_args the other train.py settings")
        if name in STUDY_SETS:
            how = f"kv_study.py's {STUDY_SETS[name]}" if STUDY_SETS[name] else "nothing: it comes from the base"
            raise UserError(f"--train_args: --{name} is set by the study for every fine-tune (set it with {how}); "
                            "--train_args is for the other train.py settings, e.g. --batch_size=8")
