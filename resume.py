"""
Resuming a training run from a checkpoint (train.py --init_from=resume: resume_run, on train.py's
settings): which schedule it goes on with, what of the optimizer, RNG and data position it
restores, which settings it keeps from the checkpoint, what makes its val loss incomparable, and
what a Ctrl-C says. Reading and writing checkpoints is checkpoint.py's.

    r = resume_run(globals(), config, given, defaults, dev, world_size)   # in train.py
    mode, start, end, origin = resume_schedule(ckpt, "auto", max_iters)
    rows_kept = restore_training_state(ckpt, mode, optimizer, scaler, loader, (batch_size, block_size))
"""
import math
import os
import shlex
import sys
import warnings
from types import SimpleNamespace

import torch

from checkpoint import _first_line, load_model, saved_dataset_paths
from loader import dataset_paths, eval_layout, same_dataset
from devices import mps_available
from model import ARCH_KEYS, MODEL_ARG_KEYS
from outdir import checkpoint_path
from schedule import Schedule
from train_checks import check_settings
from utils import UserError, project_file


def rng_state():
    """The global RNG states (dropout), for an exact resume: CUDA's where this process uses it
    (asking would start CUDA on GPU 0 for a CPU run), MPS's where there is one."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    state = {"cpu": torch.get_rng_state(), "cuda": cuda}
    if mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_training_state(ckpt, mode, optimizer, scaler, loader, shape, dataset=None):
    """Optimizer and scaler state for both modes; RNG and data position for 'continue'
    (loader None: a DDP rank > 0, which keeps its own RNG and rows). shape: this run's
    (batch_size, block_size); the data position is restored only if they and the dataset are
    the checkpoint's. Returns True when it was: the loader's rows go on where they stopped.
    A state this program cannot restore (a foreign checkpoint's) is one UserError."""
    broken = (TypeError, ValueError, RuntimeError, KeyError, IndexError, AttributeError)  # a malformed state's
    try:
        why = optimizer_mismatch(optimizer, ckpt["optimizer"]) if ckpt.get("optimizer") else "the checkpoint holds none"
        if why is None:
            moments = [t for s in ckpt["optimizer"].get("state", {}).values() for t in s.values()
                       if torch.is_tensor(t) and t.is_floating_point()]
            if not all(bool(torch.isfinite(t).all()) for t in moments):  # (the first step would turn the weights nan)
                raise UserError("the checkpoint's optimizer state holds nan or inf (its weights are finite): "
                                "--resume_mode=finetune does not help, it restores the same moments; use an "
                                "earlier checkpoint")
            # the moments come from the checkpoint, the hyperparameters from this run's config
            settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            optimizer.load_state_dict(ckpt["optimizer"])
            for group, s in zip(optimizer.param_groups, settings):
                group.update(s)
        else:
            print(f"note: optimizer state not restored ({why}); starting AdamW afresh")
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except torch.OutOfMemoryError:
        raise  # the device is full: not the checkpoint's fault
    except broken as e:
        raise UserError(f"the checkpoint's optimizer state cannot be restored ({type(e).__name__}: "
                        f"{_first_line(e)}); use another checkpoint") from None
    if mode != "continue" or loader is None:
        return False
    try:
        rng = ckpt.get("rng") or {}
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") and torch.cuda.is_initialized() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if rng.get("mps") is not None and mps_available():
            torch.mps.set_rng_state(rng["mps"])
        saved = ckpt.get("config", {})
        if dataset is not None and saved.get("dataset") and not same_dataset(saved["dataset"], dataset):
            print("note: data position not restored (another dataset)")
            return False
        same_shape = (saved.get("batch_size"), saved.get("block_size")) == tuple(shape)
        if ckpt.get("loader") and same_shape:
            loader.load_state_dict(ckpt["loader"])
            return True
        why = "batch_size or block_size changed" if ckpt.get("loader") else "the checkpoint holds none"
    except torch.OutOfMemoryError:
        raise
    except broken as e:
        raise UserError(f"the checkpoint's random state or data position cannot be restored ({type(e).__name__}: "
                        f"{_first_line(e)}); --resume_mode=finetune trains on without them") from None
    print(f"note: data position not restored ({why})")
    return False


def optimizer_mismatch(optimizer, state):
    """Why a saved AdamW state does not fit this optimizer (its groups, their parameter counts
    or shapes), as a few words; None when it fits. A TypeError if it is not an optimizer's
    state at all."""
    if not (isinstance(state, dict) and isinstance(state.get("param_groups"), list)
            and isinstance(state.get("state"), dict)):
        raise TypeError("not an optimizer's state_dict (param_groups and state)")
    groups = optimizer.param_groups
    saved = state.get("param_groups", [])
    if len(saved) != len(groups):
        return f"the saved one has {len(saved)} parameter groups, this model's optimizer {len(groups)}"
    if any(len(s["params"]) != len(g["params"]) for s, g in zip(saved, groups)):
        return "the model's parameters changed"
    for s, g in zip(saved, groups):
        for idx, p in zip(s["params"], g["params"]):
            moments = state["state"].get(idx, {})
            if "exp_avg" in moments and moments["exp_avg"].shape != p.shape:
                return "the parameter shapes changed"
    return None


def incomparable(ckpt, model_args, block_size, dataset=None):
    """What makes a resumed run's val loss incomparable with the checkpoint's best: a converted
    or otherwise changed model (model_args), another training context (block_size), another
    text (dataset); a list of 'name old -> new', empty when nothing did."""
    config = ckpt.get("config") or {}
    saved = {**ckpt["model_args"], "block_size": config.get("block_size", block_size)}
    now = {**model_args, "block_size": block_size}
    for args in (saved, now):  # n_kv_head 0 means n_head: say the number of heads
        if not args.get("n_kv_head") and "n_head" in args:
            args["n_kv_head"] = args["n_head"]
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
               if k != "dropout" and k in saved and saved[k] != now[k]]
    if dataset is not None and config.get("dataset") and not same_dataset(config["dataset"], dataset):
        changed.append(f"dataset {config['dataset']} -> {dataset}")
    return changed


def other_val_batches(ckpt, eval_set):
    """What makes a run's val loss read other batches than the checkpoint's (eval_set: this run's
    batch_size, eval_iters, seed and eval_windows (resolved), from which train.py draws its fixed
    val batches), as 'name old -> new'; a checkpoint that does not record one is taken as the
    same (eval_windows as rows: every run drew those before the setting existed)."""
    config = dict(ckpt.get("config") or {})
    if config:  # (runs before eval_windows drew rows that continue the text)
        config["eval_windows"] = eval_layout(config.get("eval_windows", "rows"), config.get("xl_mem", 0))
    return [f"{k} {config[k]!r} -> {v!r} (other val batches)" for k, v in eval_set.items()
            if config.get(k) is not None and config[k] != v]


def saved_iteration(path):
    """The iteration a checkpoint file was written at, or None (no file, or not readable)."""
    try:
        return int(peek(path)["iter_num"])
    except Exception:  # a damaged or foreign file: nothing in it to keep
        return None


def peek(path):
    """The checkpoint dict at path, its tensors mapped rather than read; raises what a missing,
    damaged or foreign file makes torch raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


# training settings that change what the loss is: a resume keeps the checkpoint's unless given
OBJECTIVE_KEYS = ("xl_mem", "xl_update", "kv_quant", "kv_quant_group", "kv_quant_keys")


def objective_settings(ckpt, settings, given):
    """The checkpoint's values of OBJECTIVE_KEYS where this run's settings differ and were not
    given (on the command line or in a config file), each with a note: a resumed XL or
    quantization-aware run goes on as it was trained. A plug-in (module:function) the checkpoint
    names must be given again: a checkpoint never chooses code to run."""
    saved, out = ckpt.get("config") or {}, {}
    for k in OBJECTIVE_KEYS:
        if saved.get(k) is None or k in given or saved[k] == settings[k]:  # (None: not recorded)
            continue
        if isinstance(saved[k], str) and ":" in saved[k]:
            raise UserError(f"the checkpoint was trained with the plug-in --{k}={saved[k]}: pass it again "
                            f"(a checkpoint never chooses code to run), or --{k}={settings[k]} to go on without it")
        out[k] = saved[k]
        print(f"note: {k}={saved[k]!r} from the checkpoint, as it was trained (--{k}=... changes it)")
    return out


def resume_schedule(ckpt, resume_mode, max_iters, eval_only=False):
    """(mode, start_iter, end_iter, origin) of a resumed run: 'continue' trains on the original
    schedule (counted from iteration 0) up to max_iters, 'finetune' max_iters more iterations on
    a schedule counted from the checkpoint's iteration (origin)."""
    start = ckpt.get("iter_num")
    if start is None:  # a checkpoint without it (the tutorial's own) counts as a finished run
        start = (ckpt.get("config") or {}).get("max_iters", 0)
        print(f"note: the checkpoint does not say its iteration; taking its max_iters, {start}")
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise UserError(f"the checkpoint's iteration {start!r} is not a count of iterations (it was not written by "
                        "train.py); use another checkpoint")
    mode = pick_resume_mode(start, resume_mode, max_iters, eval_only, (ckpt.get("config") or {}).get("max_iters"))
    if mode == "continue":
        return mode, start, max(max_iters, start), 0
    if mode == "finished":  # evaluated only, as max_iters=0
        return "finetune", start, start, start
    return mode, start, start + max_iters, start


# what a continued run's optimization depends on, besides the model: changing one makes it
# another run than the interrupted one (the note below says which and how to keep them)
RUN_SETTINGS = ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "decay_lr", "batch_size", "block_size",
                "gradient_accumulation_steps", "beta1", "beta2", "weight_decay", "grad_clip", "dropout", "reset_prob")


def changed_settings(ckpt, config):
    """A note naming the RUN_SETTINGS (and OBJECTIVE_KEYS) this continued run has other values of
    than the run its checkpoint comes from (e.g. a flag of the first run not given again), or None."""
    saved = ckpt.get("config") or {}
    keys = RUN_SETTINGS + OBJECTIVE_KEYS  # (the objective's differ only where given: restored otherwise)
    changed = [k for k in keys if k in saved and k in config and saved[k] != config[k]]
    if not changed:
        return None
    now = ", ".join(f"{k}={config[k]!r}" for k in changed)
    before = shlex.join(f"--{k}={saved[k]}" for k in changed)
    return (f"note: this run goes on with {now}, not the checkpoint's run's values; to go on exactly as that run "
            f"would have, pass {before}")


def only_evaluates(path, resume_mode, max_iters):
    """Whether resuming the checkpoint at path with these settings trains nothing (auto on a
    finished run: pick_resume_mode), read before train.py claims out_dir for writing; False
    where it cannot be read (the resume then says why)."""
    if resume_mode != "auto" or max_iters <= 0:
        return False
    try:
        ckpt = peek(path)
        config = ckpt.get("config") or {}
        it = ckpt.get("iter_num", config.get("max_iters"))
        return max_iters == config.get("max_iters") == it
    except Exception:  # a missing, damaged or foreign file
        return False


def pick_resume_mode(ckpt_iter, resume_mode, max_iters, eval_only=False, run_max_iters=None):
    """'continue' (the original schedule up to max_iters) or 'finetune' (max_iters more
    iterations, a fresh schedule) for a checkpoint at iteration ckpt_iter; says why. With auto,
    'finished' where the checkpoint's run reached its own max_iters (run_max_iters) and this
    one asks for the same: the tutorial's resume command on a finished run only evaluates it."""
    if eval_only:
        print("eval_only: the checkpoint is evaluated once; nothing is trained or written")
        return "finetune"
    if resume_mode == "continue":
        if max_iters <= ckpt_iter:
            raise UserError(f"--resume_mode=continue trains up to max_iters={max_iters} on the original schedule, and "
                            f"the checkpoint is already at iteration {ckpt_iter}: nothing to train. Raise --max_iters, "
                            f"or --resume_mode=finetune trains {max_iters} more")
        print(f"resume_mode=continue: training up to iteration {max_iters} on the original schedule")
    elif resume_mode == "finetune":
        print(f"resume_mode=finetune: {max_iters} more iterations with a fresh LR schedule")
    elif max_iters > ckpt_iter:
        print(f"resume_mode=auto chose 'continue': max_iters={max_iters} is beyond the checkpoint's "
              f"iteration {ckpt_iter}, so the original schedule goes on up to iteration {max_iters}")
        return "continue"
    elif max_iters == 0:
        print("resume_mode=auto: max_iters=0, so the checkpoint is only evaluated")
        return "finetune"
    elif max_iters == run_max_iters == ckpt_iter:  # (a fine-tune's own max_iters counts from its start)
        print(f"resume_mode=auto: the checkpoint's run is finished (iteration {ckpt_iter}, its max_iters={max_iters}), "
              f"so it is only evaluated; to train on: --max_iters=K (more than {ckpt_iter}) goes on with its schedule, "
              f"--resume_mode=finetune --max_iters=K trains K more on a fresh one")
        return "finished"
    else:
        print(f"resume_mode=auto chose 'finetune': max_iters={max_iters} is not beyond the checkpoint's "
              f"iteration {ckpt_iter}, so {max_iters} more iterations run with a fresh warm-up and LR schedule")
        return "finetune"
    return resume_mode


def later_last(out_dir, ckpt_path, start_iter):
    """A resume from ckpt.pt (the best val loss) must not lose a last.pt written later in the
    run: returns the free name last_<its iteration>.pt that it moves to when this run first
    writes last.pt (None when there is nothing to keep), after saying so."""
    last = os.path.join(out_dir, "last.pt")
    if os.path.abspath(ckpt_path) == os.path.abspath(last):
        return None
    later = saved_iteration(last)
    if later is None or later <= start_iter:
        return None
    kept = free_name(out_dir, f"last_{later}")
    print(f"note: {last} (iteration {later}) is later than {ckpt_path} (iteration {start_iter}); this run keeps it "
          f"as {kept} when it writes its own last.pt (--resume_checkpoint_name=last resumes from it instead)")
    return kept


def earlier_best(out_dir, model_args, block_size, dataset, eval_set=None):
    """A resumed run writes the best of its own evaluations into ckpt.pt; the ckpt.pt there
    may be the best of another model, context or text (a conversion, a longer block_size, or
    the run before one that was cut short), whose loss this run's cannot be compared with. So
    that it is not lost (nor one evaluated on other val batches, eval_set as other_val_batches):
    returns the free name ckpt_<its iteration>.pt it moves to when this
    run first writes ckpt.pt (None when there is none to keep), after saying so."""
    best = os.path.join(out_dir, "ckpt.pt")
    try:
        old = peek(best)
        changed = incomparable(old, model_args, block_size, dataset) + other_val_batches(old, eval_set or {})
    except Exception:  # none there, or a file with nothing in it to keep
        return None
    if not changed:
        return None
    at = old.get("iter_num", (old.get("config") or {}).get("max_iters"))  # (the tutorial's: as resume_schedule)
    at = at if isinstance(at, int) and not isinstance(at, bool) else 0
    kept = free_name(out_dir, f"ckpt_{at}")
    print(f"note: {best} (iteration {at}) is the best of another run ({', '.join(changed)}); this run keeps it as "
          f"{kept} when it writes its own ckpt.pt")
    return kept


def free_name(out_dir, stem):
    """out_dir/stem.pt, or stem_2.pt, stem_3.pt, ... the first that does not exist."""
    kept, n = os.path.join(out_dir, f"{stem}.pt"), 1
    while os.path.exists(kept):
        n += 1
        kept = os.path.join(out_dir, f"{stem}_{n}.pt")
    return kept


def interrupted(out_dir, iter_num, start_iter, origin, end_iter, signum=2):
    """After Ctrl-C or SIGTERM: say what last.pt holds and how to go on; exit 128 + the
    signal's number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports them."""
    last = os.path.join(out_dir, "last.pt")
    if iter_num == start_iter:
        print("interrupted before the first iteration of this run; nothing was written", flush=True)
    elif origin:  # a fine-tune's schedule starts at its own first iteration, which no checkpoint records
        left = end_iter - iter_num
        print(f"interrupted with {iter_num} iterations done; {last} holds them. A fine-tune's schedule does not resume "
              f"exactly; to train the {left} iterations left on a fresh schedule of their own: "
              f"{resume_command(resume_mode='finetune', max_iters=left)}", flush=True)
    else:
        print(f"interrupted with {iter_num} iterations done; {last} holds them. To go on exactly where it stopped: "
              f"{resume_command()}", flush=True)
    raise SystemExit(128 + signum)


def stopped_at_once(out_dir, last_written, origin):
    """After a Ctrl-C that stops at once (before the loop, or a second one in it): what last.pt
    holds, and the command that goes on from it only where this run wrote it (last_written: the
    iteration it last wrote, or None), on the schedule it resumes (not a fine-tune's, origin > 0,
    which no checkpoint records; one process: torchrun has its own line)."""
    last = os.path.join(out_dir, "last.pt")
    at = saved_iteration(last)
    ours = at is not None and at == last_written
    mine = ours and not origin and int(os.environ.get("WORLD_SIZE", 1)) == 1
    print("\nstopped at once" + (f"; {last} holds iteration {at}" if at is not None else "")
          + (" (an earlier run's: this one did not write it)" if at is not None and not ours else "")
          + (f". To go on from it: {resume_command()}" if mine else ""), flush=True)


def resume_command(**flags):
    """This run's train.py command line, made to resume from last.pt (flags: settings to give
    instead of the run's own, e.g. max_iters=70)."""
    drop = ("--init_from=", "--resume_checkpoint_name=", *(f"--{k}=" for k in flags))
    args = [a for a in sys.argv[1:] if not a.startswith(drop)] + [f"--{k}={v}" for k, v in flags.items()]
    return f"python {project_file('train.py')} {shlex.join(args)} --init_from=resume --resume_checkpoint_name=last"


def resume_run(g, config, given, defaults, dev, world_size):
    """The model of out_dir's checkpoint on dev, this run's schedule and the text it trains on,
    for train.py's settings g (its globals). Settings the checkpoint was trained with (XL memory
    and QAT unless given, its dataset unless given as a flag) go on (kept in g and in config);
    the fine-tune's schedule is fitted to max_iters (in g and config too)."""
    if g["overwrite"]:  # (it lets a run from scratch replace out_dir's checkpoints)
        print("note: --overwrite=True applies to a run from scratch only; this resume writes ckpt.pt and last.pt "
              "in out_dir as any resume does")
    ckpt_path = checkpoint_path(g["out_dir"], g["resume_checkpoint_name"], "resume_checkpoint_name")
    # the non-architecture model keys given on the command line or in a config file
    # (their defaults too: --attention=softmax turns a naive-attention checkpoint back to softmax)
    overrides = {k: config[k] for k in MODEL_ARG_KEYS if k not in ARCH_KEYS and k in given}
    model, ckpt = load_model(ckpt_path, dev, overrides, option="resume_checkpoint_name")
    kept = objective_settings(ckpt, config, given)  # a resumed XL or QAT run goes on as it was trained
    g.update(kept)
    config.update(kept)
    # and on the text it was trained on (a folder it names is only read: saved_dataset_paths),
    # unless a flag names another: a recipe's config file names a dataset too (the CPU recipe
    # resuming a Czech run must not go on in English)
    flagged = {a[2:].partition("=")[0] for a in sys.argv[1:] if a.startswith("--")}
    saved_data = (ckpt.get("config") or {}).get("dataset")
    if "dataset" not in flagged and isinstance(saved_data, str) and saved_data \
            and not same_dataset(saved_data, g["dataset"]):
        said = f"the config file says {g['dataset']!r}: " if "dataset" in given else ""
        print(f"note: dataset={saved_data!r} from the checkpoint, as it was trained ({said}--dataset=... changes it)")
        # (a folder an older checkpoint named relative to where it ran: recorded from here on as
        # the folder read now)
        named = os.path.abspath(saved_data) if "/" in saved_data or os.sep in saved_data else saved_data
        g["dataset"] = config["dataset"] = named
        train_path, val_path = saved_dataset_paths(saved_data, ckpt_path)
    else:
        train_path, val_path = dataset_paths(g["dataset"])
    if kept:
        try:
            check_settings(g, world_size)  # the checkpoint's settings with this run's
        except UserError as e:
            off = " ".join(f"--{k}={defaults[k]}" for k in kept)
            raise UserError(f"{e} ({', '.join(kept)} from the checkpoint: {off} goes on without)") from None
    for note in ckpt["conversions"]:
        print(f"converted: {note}")
    model_args = {k: getattr(model.config, k) for k in MODEL_ARG_KEYS}
    for k in ARCH_KEYS:
        if config[k] != model_args[k]:
            said = f"--{k} says" if k in flagged else "the config says" if k in given else "train.py's default is"
            print(f"note: {k}={model_args[k]!r} from the checkpoint ({said} {config[k]!r})")
    eval_only, max_iters = g["eval_only"], g["max_iters"]
    mode, start_iter, end_iter, origin = resume_schedule(ckpt, g["resume_mode"], max_iters, eval_only)
    if mode == "finetune" and end_iter > start_iter and not eval_only:  # (eval_only trains nothing: no schedule)
        fit, note = Schedule.from_settings(g).fit(max_iters, flagged)
        if fit:
            g.update(fit)
            config.update(fit)
            print(note)
    elif mode == "continue" and (note := changed_settings(ckpt, {**config, **model_args})):  # (dropout: the model's)
        print(note)
    best_val_loss = ckpt.get("best_val_loss", float("inf"))
    best = f"{best_val_loss:.4f}" if math.isfinite(best_val_loss) else "none yet"
    print(f"resumed {ckpt_path} at iteration {start_iter}, best val loss {best}")
    changed = incomparable(ckpt, model_args, g["block_size"], g["dataset"])
    other = other_val_batches(ckpt, val_batches(g))
    if (changed or other) and not eval_only and end_iter > start_iter:  # another model's val loss, or other batches'
        best_val_loss = float("inf")
        print(f"note: {', '.join(changed + other)}: the checkpoint's best val loss is not comparable, so ckpt.pt "
              "will hold the best of this run")
    elif changed or other:  # an evaluation alone (--eval_only, or --max_iters at the checkpoint's iteration)
        print(f"note: {', '.join(changed + other)}: this evaluation is not comparable with the checkpoint's best "
              "val loss")
    return SimpleNamespace(model=model, ckpt=ckpt, ckpt_path=ckpt_path, model_args=model_args, train_path=train_path,
                           val_path=val_path, mode=mode, start_iter=start_iter, end_iter=end_iter, origin=origin,
                           best_val_loss=best_val_loss, changed=changed)


def val_batches(g):
    """What the fixed loss batches of a run of train.py's settings g are drawn from
    (other_val_batches compares it with a checkpoint's)."""
    return dict(batch_size=g["batch_size"], eval_iters=g["eval_iters"], seed=g["seed"],
                eval_windows=eval_layout(g["eval_windows"], g["xl_mem"]))
