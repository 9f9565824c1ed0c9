"""
train.py's settings checked before any work: one UserError for a value or a combination that
would fail later with a less clear message, or that a model would silently ignore.

    from train_checks import check_settings
    check_settings(globals())   # train.py's settings, its globals
"""
from types import SimpleNamespace

from kv.policy import KVOptions
from loader import EVAL_WINDOWS
from utils import SEED_MAX, UserError, check_range


def check_settings(g, world_size=1):
    """Reject values of train.py's settings g (its globals) that would fail later with a less
    clear message."""
    s = SimpleNamespace(**g)
    if s.init_from not in ("scratch", "resume"):
        gpt2 = " (GPT-2's weights do not fit this byte-level model)" if s.init_from.startswith("gpt2") else ""
        raise UserError(f"--init_from must be 'scratch' or 'resume', got {s.init_from!r}{gpt2}")
    if s.resume_mode not in ("auto", "continue", "finetune"):
        raise UserError(f"--resume_mode must be 'auto', 'continue' or 'finetune', got {s.resume_mode!r}")
    for name in ("eval_interval", "eval_iters", "log_interval", "batch_size", "block_size",
                 "gradient_accumulation_steps"):
        if g[name] < 1:
            raise UserError(f"--{name} must be at least 1, got {g[name]}")
    if s.gradient_accumulation_steps % world_size:
        raise UserError(f"--gradient_accumulation_steps={s.gradient_accumulation_steps} must be a multiple of the "
                        f"{world_size} DDP processes, which share the micro-steps equally (e.g. "
                        f"--gradient_accumulation_steps={world_size * s.gradient_accumulation_steps})")
    if s.backend not in ("", "nccl", "gloo", "mpi", "ucc"):
        raise UserError(f"--backend={s.backend}: use nccl (GPUs), gloo (CPUs) or '' (picks one)")
    if s.threads < 0:
        raise UserError(f"--threads must be 0 (chosen automatically) or a number of threads, got {s.threads}")
    if s.init_from == "scratch" and s.global_layers and not s.window:  # (a resume takes window from the checkpoint)
        raise UserError(f"--global_layers={s.global_layers} picks the layers that stay global among local ones: "
                        "add --window=N (the local span), or drop --global_layers")
    if s.xl_mem < 0:
        raise UserError(f"--xl_mem must be 0 (off) or a number of tokens, got {s.xl_mem}")
    if s.eval_windows not in EVAL_WINDOWS:
        raise UserError(f"--eval_windows must be one of {', '.join(EVAL_WINDOWS)}, got {s.eval_windows!r}")
    if s.xl_mem and s.eval_windows == "random":
        raise UserError("--eval_windows=random gives every val row a window of its own, and --xl_mem carries memory "
                        "from a row's batch to its next: use --eval_windows=rows (or auto)")
    if s.xl_mem and s.kv_quant != "none":
        raise UserError("--kv_quant (quantization-aware training) does not combine with --xl_mem; drop one")
    KVOptions(kv_quant=s.kv_quant, kv_quant_group=s.kv_quant_group,
              kv_quant_keys=s.kv_quant_keys).check().check_unused()  # as sample.py
    if s.max_iters < 0:
        raise UserError(f"--max_iters must be 0 or more, got {s.max_iters}")
    if not 0.0 < s.last_save_budget <= 1.0:
        raise UserError(f"--last_save_budget must be in (0, 1], got {s.last_save_budget}")
    check_range(g, "learning_rate min_lr weight_decay grad_clip warmup_iters lr_decay_iters", 0)
    if s.decay_lr and s.min_lr > s.learning_rate:
        raise UserError(f"--min_lr={s.min_lr:g} is above --learning_rate={s.learning_rate:g}: the rate would rise "
                        "where it should decay; lower --min_lr (learning_rate / 10 is usual), or --decay_lr=False")
    check_range(g, "beta1 beta2 dropout", 0, 1, high_open=True)
    check_range(g, "reset_prob", 0, 1)
    check_range(g, "seed", -SEED_MAX, SEED_MAX)


def check_variant(c, fresh, xl_mem, block_size):
    """One UserError for settings this model (GPTConfig c) would silently ignore or misuse; a
    note where a new model's local window is wider than the rows it trains on."""
    if c.no_kv_cache and xl_mem:  # (a resume's xl_mem may be the checkpoint's: --xl_mem=0 goes on without)
        raise UserError(f"xl_mem={xl_mem}: every layer of this model is linear attention, whose state (not a "
                        "memory of xl_mem tokens) would carry across batches, at positions growing without bound; "
                        "train it with --xl_mem=0")
    if fresh and c.no_kv_cache and c.window:
        raise UserError(f"--window={c.window} bounds softmax layers, and every layer of this model is linear "
                        "attention: it would change nothing; drop --window")
    if fresh and c.window > block_size and any(c.is_local(i) and not c.keeps_state(i) for i in range(c.n_layer)):
        print(f"note: --window={c.window} is wider than --block_size={block_size}: the local layers see every byte "
              f"of their rows, as global ones do, and never a distance past {block_size} (the sample command "
              "at the end bounds the cache there)")
