"""
Assignment 1 through kv_study.py --what=context: how many steps does a model trained at a
block of B bytes need to use a context of 4B? Bits per byte on positions [B, 4B) of val
streams of 4B bytes, after 0, 25, 50, ... iterations of fine-tuning at 4B (an unbounded
cache), next to the base reading the same bytes with a sliding window of B. Each fine-tune
runs in a folder of its own (kv/study_finetune.py); a rerun redoes only what its settings change.

    python kv_study.py --base=out-shakespeare-char-cpu --what=context --context_iters=0,25,50
"""
import os
import sys

from checkpoint import load_model
from fileio import read_json, write_json
from kv.evaluate import buckets, evaluate
from kv.policy import KVOptions
from kv.report import check_writable, write_text
from kv.study_finetune import base_block, base_identity, base_streams, changes, fine_tune, fine_tune_state, hyper
from outdir import checkpoint_path, make_folder
from resume import saved_iteration
from utils import UserError


def iteration_counts(text):
    """--context_iters as a list of whole numbers of iterations, or one UserError."""
    counts = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit():
            raise UserError(f"--context_iters={text}: {part!r} is not a whole number of iterations; "
                            "give numbers >= 0 separated by commas, e.g. --context_iters=0,25,50")
        counts.append(int(part))
    if not counts:
        raise UserError("--context_iters is empty: give numbers >= 0 separated by commas, e.g. --context_iters=0,25,50")
    return counts


def context(s, storage):
    """The table of kv_study.py --what=context, for its settings s (its globals: base, out,
    context_iters, context_streams, dtype and the fine-tunes' learning rates, threads, curves
    and train_args); storage: the torch dtype of what the caches keep in full precision."""
    base = s["base"]
    base_path = base if base.endswith(".pt") else checkpoint_path(base, "ckpt")
    folder = s["out"] or os.path.join(os.path.dirname(base_path), "kv_study_context")
    _, ckpt = load_model(base_path, "cpu", option="base")
    config = ckpt.get("config") or {}
    block = base_block(config, base_path)
    L = 4 * block
    make_folder(folder, "out")
    check_writable(os.path.join(folder, "context"), [".md"], False, "--out")
    x, y = base_streams(config, base_path, s["context_streams"], L)
    far = [(lo, hi) for lo, hi in buckets(block, L) if lo >= block]

    def measure(path, kv, name):
        """Bits per byte of the checkpoint at path with caches kv: near [0, block), far [block, L), all."""
        model, _ = load_model(path, "cpu", option=None)
        model.eval()
        [r] = evaluate(model, x, y, [kv], L, kv, block, None, storage)
        return dict(iters=name, bpb_near=r[f"bpb[0,{block})"], bpb_all=r["bpb"],
                    bpb_far=sum((hi - lo) * r[f"bpb[{lo},{hi})"] for lo, hi in far) / (L - block))

    # the comparison: the base reading the same bytes at its natural context (a sliding window)
    rows = [measure(base_path, KVOptions(kv_window=block), f"0, window {block}")]
    # a row depends on its fine-tune's settings (tuned) and the evaluation's: a rerun redoes
    # what they change, a fine-tune only when its own settings do
    tuned = dict(base_identity(ckpt, base_path), learning_rate=s["learning_rate"], min_lr=s["min_lr"],
                 train_args=s["train_args"])
    wanted = {"context_streams": s["context_streams"], "dtype": s["dtype"], "fine-tune": tuned}
    for k in iteration_counts(s["context_iters"]):
        vdir = os.path.join(folder, f"iters_{k}")
        done = os.path.join(vdir, "results.json")
        record = read_json(done)  # the settings its row came from
        if isinstance(record, dict) and record.get("settings") == wanted:
            print(f"{k} iterations at block {L}: done before, skipped", file=sys.stderr)
            rows.append(record["row"])
            continue
        ft, _, trained = fine_tune_state(vdir, [] if k else None, tuned)
        if record is not None:
            old = record.get("settings", {}) if isinstance(record, dict) else {}
            flat = lambda st: {**{n: v for n, v in st.items() if n != "fine-tune"}, **(st.get("fine-tune") or {})}
            print(f"{k} iterations at block {L}: done before with other settings "
                  f"({', '.join(changes(flat(old), flat(wanted)))}), " + ("evaluated again" if trained else "redone"),
                  file=sys.stderr)
        print(f"{k} iterations at block {L}" + (": fine-tuning" if not trained else ""), file=sys.stderr)
        path = base_path
        if k:
            if not trained:
                ft = {"settings": tuned, "command": fine_tune(base_path, vdir, [], k, config, hyper(s), block=L)}
                ft["last_iter"] = saved_iteration(os.path.join(vdir, "last.pt"))
                write_json(os.path.join(vdir, "finetune.json"), ft)
            path = os.path.join(vdir, "last.pt")
        record = {"settings": wanted, "row": measure(path, KVOptions(kv_window=0), k)}
        write_json(done, record)
        rows.append(record["row"])
    lines = [f"### Fine-tuning at {L} bytes from {base_path} (block {block}): {s['context_streams']} val streams of "
             f"{L} bytes", "", f"| iterations at block {L} | bits/byte [0, {block}) | bits/byte [{block}, {L}) | all |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['iters']} | {r['bpb_near']:.4f} | {r['bpb_far']:.4f} | {r['bpb_all']:.4f} |" for r in rows]
    md = "\n".join(lines) + "\n"
    print(md)  # before the file: a failed write loses nothing
    write_text(os.path.join(folder, "context.md"), md)
    print(f"wrote {os.path.join(folder, 'context.md')}")
