"""
The KV study's fine-tunes (kv_study.py): each is train.py --init_from=resume run in a folder of
its own from a copy of the base, its output in train.log, its settings and last iteration in
finetune.json, so that a rerun knows a finished fine-tune from one cut short. Also what the
study reads of its base (its block_size, its val text, its identity in the records) and how
a record's settings changed.

    from kv.study_finetune import fine_tune, fine_tune_state
    hyper = dict(learning_rate=1e-3, min_lr=1e-4, threads=1, tensorboard=False, train_args="")
    again = fine_tune("out/ckpt.pt", "out/kv_study/mqa", ["--n_kv_head=1"], 1000, config, hyper)
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from checkpoint import saved_dataset_paths
from fileio import read_json
from kv.evaluate import load_streams
from kv.policy import saved_tokens
from loader import dataset_paths
from resume import saved_iteration
from utils import UserError

TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")

# what a fine-tune leaves in its folder: its record, its checkpoints (train.py keeps a later
# last.pt as last_<iter>.pt when it resumes from ckpt.pt), its TensorBoard curves and its log
FINE_TUNE_FILES = re.compile(r"finetune\.json|last(_\d+){0,2}\.pt|events\.out\.tfevents\..*|train\.log")
# the base's copy that train.py set aside as the best of another model (a conversion, a longer
# block): the base is where it came from, so it goes
BASE_SET_ASIDE = re.compile(r"ckpt_\d+(_\d+)?\.pt")


HYPER = ("learning_rate", "min_lr", "threads", "tensorboard", "train_args")  # the study's settings of every fine-tune


def hyper(settings):
    """The fine-tunes' settings (HYPER) from the study's (kv_study.py's globals)."""
    return {k: settings[k] for k in HYPER}


def fine_tune_command(folder, args, k, config, hyper, block=None):
    """The train.py command (a list) of a fine-tune in `folder`: k more iterations with args;
    hyper: the study's learning_rate, min_lr, threads, tensorboard and train_args."""
    h = hyper
    return [sys.executable, TRAIN_PY, "--init_from=resume", f"--out_dir={folder}",
            "--resume_mode=finetune", f"--max_iters={k}", f"--learning_rate={h['learning_rate']}",
            f"--min_lr={h['min_lr']}",
            f"--warmup_iters={max(k // 10, 1)}", f"--lr_decay_iters={k}", f"--eval_interval={max(k, 1)}",
            "--eval_iters=10", f"--log_interval={max(min(k // 4, 50), 1)}", f"--dataset={config['dataset']}",
            f"--batch_size={config['batch_size']}", f"--block_size={block or config['block_size']}",
            f"--device={config.get('device') or 'cpu'}", f"--threads={h['threads']}",
            f"--tensorboard={h['tensorboard']}", *args, *shlex.split(h["train_args"])]


def again_command(base_path, folder, cmd):
    """Shell commands that train the fine-tune of cmd once more, in folder_again: a copy of the
    base in a folder of its own (train.py resumes from out_dir's ckpt.pt, and the study's folder
    holds the fine-tuned one)."""
    again = folder.rstrip(os.sep) + "_again"
    q = lambda c: shlex.quote(c.replace(folder, again))
    return (f"mkdir -p {q(folder)} && cp {q(base_path)} {q(os.path.join(folder, 'ckpt.pt'))} && python "
            + " ".join(q(c) for c in cmd[1:]))


def fine_tune(base_path, folder, args, k, config, hyper, block=None):
    """train.py --init_from=resume from a copy of the base in `folder`, k more iterations with
    args (fine_tune_command); returns the commands that train it again (again_command). Its
    output goes to folder/train.log. What an earlier fine-tune left there goes first: its record
    (a fine-tune cut short is then never taken for a finished one), its checkpoints, its curves and
    its log; they are kept aside until this one has run, and put back if it fails at once (a wrong
    train.py argument, settings that do not combine), so a rerun never loses a finished fine-tune
    for nothing; the failed run's output is then in folder/train_failed.log."""
    os.makedirs(folder, exist_ok=True)
    aside = os.path.join(folder, "previous_fine_tune")
    shutil.rmtree(aside, ignore_errors=True)
    os.makedirs(aside)
    for name in os.listdir(folder):
        if FINE_TUNE_FILES.fullmatch(name) or name == "ckpt.pt":
            os.replace(os.path.join(folder, name), os.path.join(aside, name))
    shutil.copyfile(base_path, os.path.join(folder, "ckpt.pt"))
    cmd = fine_tune_command(folder, args, k, config, hyper, block)
    # an earlier fine-tune comes back when this one trained nothing
    put_back = lambda: os.listdir(aside) and not os.path.exists(os.path.join(folder, "last.pt"))  # noqa: E731
    t0 = time.time()
    try:
        with open(os.path.join(folder, "train.log"), "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)  # (paths are the caller's)
            try:
                proc.wait()
            except KeyboardInterrupt:
                stop(proc)  # (its train.log then ends with how it stopped)
                raise
        if proc.returncode != 0:
            with open(os.path.join(folder, "train.log"), errors="replace") as log:
                said = [line.strip() for line in log if line.startswith("error: ")]
            why = f": {said[-1][len('error: '):]}" if said else ""
            log = "train_failed.log" if put_back() else "train.log"  # (put back: the earlier one's log returns)
            raise UserError(f"the fine-tune in {folder} failed (exit {proc.returncode}){why}; see "
                            f"{os.path.join(folder, log)}")
    except BaseException:  # (Ctrl-C too)
        if put_back():
            if os.path.exists(os.path.join(folder, "train.log")):
                os.replace(os.path.join(folder, "train.log"), os.path.join(folder, "train_failed.log"))
            for name in os.listdir(aside):
                os.replace(os.path.join(aside, name), os.path.join(folder, name))
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    print(f"  fine-tuned {k} iterations in {time.time() - t0:.0f}s", file=sys.stderr)
    if os.path.exists(os.path.join(folder, "train_failed.log")):  # (an earlier attempt's: this one ran)
        os.remove(os.path.join(folder, "train_failed.log"))
    for name in os.listdir(folder):
        if BASE_SET_ASIDE.fullmatch(name):
            os.remove(os.path.join(folder, name))
    return again_command(base_path, folder, cmd)


def stop(proc):
    """Let a train.py sent Ctrl-C finish its step and write last.pt; one that was not sent it
    (a kill, or Ctrl-C to this process alone) gets SIGTERM now, which train.py takes as Ctrl-C
    (not SIGINT: a job started with & ignores it, and so does its train.py); one still running
    after a minute, or at a second Ctrl-C, is killed."""
    try:
        try:
            proc.wait(timeout=2)  # a terminal's Ctrl-C reaches the whole process group
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=60)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
    proc.wait()


def fine_tune_state(vdir, args, tuned):
    """(its record, the iteration its last.pt ends at, whether it is finished with the settings
    `tuned`) of a variant's fine-tune; the base (args None) needs none."""
    ft = read_json(os.path.join(vdir, "finetune.json")) or {}  # the fine-tune's settings, command and last iteration
    ended = saved_iteration(os.path.join(vdir, "last.pt"))  # (another when a later fine-tune was cut short)
    trained = args is None or (ft.get("settings") == tuned and ended is not None and ended == ft.get("last_iter"))
    return ft, ended, trained


# -- the base ---------------------------------------------------------------------------------

def base_block(config, path):
    """The block_size the base was trained at (its saved config), or one UserError."""
    block = saved_tokens(config, "block_size")
    if not block:
        raise UserError(f"{path} does not record the block_size it was trained at: study a checkpoint train.py wrote")
    return block


def base_streams(config, base_path, n, L):
    """n val streams of L bytes (x, y) of the text the base was trained on."""
    name = config.get("dataset", "")
    _, val = saved_dataset_paths(name, base_path) if name else dataset_paths("shakespeare_char")
    return load_streams(val, n, L)


def base_identity(ckpt, base_path):
    """The base checkpoint, as recorded beside results: its path, iteration and best val loss."""
    return dict(base=os.path.abspath(base_path), base_iter=ckpt.get("iter_num"), base_best=ckpt.get("best_val_loss"))


def changes(old, new):
    """'name old -> new' for each setting that differs ('not recorded' when old is empty)."""
    if not old:
        return ["not recorded"]
    return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
