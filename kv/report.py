"""
The ruler's outputs: eval_kv's results (one dict per cache setting, see kv.evaluate.evaluate) as a
markdown table, a CSV file, a PNG of the frontier and TensorBoard scalars.

    from kv.report import frontier, markdown, write_outputs
    print(markdown(results, "my run"))
    write_outputs(results, "out/eval_kv_quick", "my run", use_tb=True)   # .csv, .md, .png, TensorBoard

Every file is written atomically (a temporary file renamed over it), and check_writable says
before a long run whether the files will be writable at its end.
"""

import csv
import io
import math
import os
import tempfile

from fileio import atomic_write
from utils import UserError


def signed_pct(x):
    """A signed percentage to two decimals; one that rounds to zero reads +0.00%, never -0.00%."""
    return f"{round(x, 2) + 0.0:+.2f}%"


def frontier(results):
    """Indices of the settings no other beats on both KV bits per token and bits per byte."""
    order = sorted(range(len(results)), key=lambda i: (results[i]["kv_bits_per_token"], results[i]["bpb"]))
    best, keep = float("inf"), []
    for i in order:
        if results[i]["bpb"] < best:
            best = results[i]["bpb"]
            keep.append(i)
    return set(keep)


def markdown(results, title):
    """The results as markdown: the table with the frontier marked, the baseline, the
    settings within 1% of it (and those more than 1% better), and bits per byte by position bucket."""
    front = frontier(results)
    base = results[0]
    lines = [f"### {title}", "",
             "| setting | peak KV bits/stream | bits/token of text | x smaller | bits/byte | vs baseline | KL (bits) "
             "| frontier |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for i, r in enumerate(results):
        lines.append(f"| {r['setting']} | {r['kv_bits_peak']:,} | {r['kv_bits_per_token']:,.2f} | "
                     f"{r['x_smaller']:.2f} | {r['bpb']:.4f} | {signed_pct(r['delta_pct'])} | {r['kl_bits']:.5f} | "
                     f"{'*' if i in front else ''} |")
    lines += ["", f"Baseline: {base['baseline']}, {base['bpb_base']:.4f} bits per byte, "
              f"{base['kv_bits_peak_base']:,} peak KV bits per stream. Peak KV bits: the most a token-by-token "
              "decoder holds at once (every layer's keys and values), whatever the chunk; bits/token of text = "
              "peak / tokens of the stream (sample.py's bits per cached token = peak / tokens held, a linear layer's fixed state apart); x smaller = the baseline's peak / the row's; KL from this checkpoint's "
              "reference."]
    # within 1% either way; those more than 1% better are named apart (another checkpoint as
    # the baseline, or a setting that changed what the model reads rather than kept it)
    name = lambda r: f"`{r['setting']}`"  # quoted: a setting may be `none`  # noqa: E731
    close = [name(r) for r in results if -1.0 <= r["delta_pct"] <= 1.0]
    better = [name(r) for r in results if r["delta_pct"] < -1.0]
    lines += ["", f"Within 1% of the baseline's {base['bpb_base']:.4f} bits per byte (either way): "
              + (", ".join(close) if close else "no setting") + "."
              + (f" More than 1% better: {', '.join(better)}." if better else ""), ""]
    cols = [k for k in results[0] if k.startswith("bpb[")]
    lines += ["| setting | " + " | ".join(c[3:] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {r['setting']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |" for r in results]
    return "\n".join(lines) + "\n"


def plot(results, path, title):
    """bits per byte against KV bits per token (log scale): the frontier joined in red, each of
    its points named in the legend (every setting is in the .md table); a point far above
    the rest is drawn at the top edge with its value, so it does not squash the others."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [r["kv_bits_per_token"] for r in results]
    ys = [r["bpb"] for r in results]
    front = sorted(frontier(results), key=lambda i: xs[i])
    names = [results[i]["setting"] for i in front]
    shared = os.path.commonprefix([n[::-1] for n in names])[::-1]  # e.g. ", window 64" on every one
    shared = shared[shared.find(", "):] if ", " in shared and len(names) > 1 else ""
    base = results[0]["bpb_base"]
    top = max(max(ys[i] for i in front), base) + 0.25 * (max(max(ys[i] for i in front), base) - min(ys) + 0.1)
    others = [i for i in range(len(results)) if i not in front]
    ax.scatter([xs[i] for i in others], [min(ys[i], top) for i in others], color="tab:gray", zorder=2,
               label="other settings")
    middle = math.sqrt(min(xs) * max(xs)) if min(xs) > 0 else 0  # of the log-scale x axis
    for n, i in enumerate(sorted((i for i in others if ys[i] > top), key=lambda i: xs[i])):
        left = xs[i] <= middle  # the label runs inwards from its point, one line below the last
        ax.annotate(f"{results[i]['setting']}: {ys[i]:.2f} \u2191", (xs[i], top), fontsize=7,
                    ha="left" if left else "right", textcoords="offset points",
                    xytext=(4 if left else -4, -10 - 9 * n))
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="tab:red", zorder=3)
    for n, i in enumerate(front):
        ax.scatter([xs[i]], [ys[i]], marker="os^vDP*Xph"[n % 10], s=50, zorder=4,
                   label=names[n][:len(names[n]) - len(shared)] + f" ({xs[i]:,.2f}, {ys[i]:.4f})")
    ax.axhline(base, color="gray", ls="--", lw=1, label=f"baseline: {results[0]['baseline']}")
    ax.set_ylim(min(ys) - 0.05 * (top - min(ys) + 0.1), top + 0.02)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV bits per token of the stream (a decoder's peak KV bits / tokens)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title + "\nthe frontier in red" + (f", every one of its settings with {shared[2:]}" if shared else ""),
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def write_outputs(results, prefix, title, use_tb, png=True, show=None, notes=()):
    """prefix.csv, prefix.md, prefix.png (with png) and TensorBoard scalars in the folder prefix/,
    each file atomically; returns the markdown. show(markdown), if given, comes first, so a
    file that cannot be written (a UserError naming it: write_file) loses no results. notes:
    lines that qualify the table (said on the terminal already), kept above it in prefix.md."""
    md = markdown(results, title)
    if show is not None:
        show(md)
    write_csv(prefix + ".csv", results, list(results[0]))
    title_line, rest = md.split("\n", 1)  # (the notes go under the title, above the table)
    write_text(prefix + ".md", title_line + "\n" + "".join(f"\n{n}\n" for n in notes) + rest)
    if png:
        plot(results, prefix + ".png", title)
    if use_tb:
        with tensorboard_writer(prefix) as tb:
            for i, r in enumerate(results):  # step = the setting's row in the table
                for k in ("bpb", "kl_bits", "kv_bits_per_token", "x_smaller", "delta_pct"):
                    tb.add_scalar(f"eval_kv/{k}", r[k], i)
                # (a step is a whole number: thousandths of a bit keep settings under a bit apart)
                tb.add_scalar("eval_kv/bpb_vs_kv_millibits_per_token", r["bpb"], round(1000 * r["kv_bits_per_token"]))
            tb.add_text("eval_kv/table", md)
    return md


def tensorboard_writer(folder):
    """A SummaryWriter into folder, which an earlier run's scalars leave first: like the CSV
    beside them, they are the table of this run, not added to the last one's."""
    from torch.utils.tensorboard import SummaryWriter  # slow import, only when used
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith("events.out.tfevents."):
                os.remove(os.path.join(folder, name))
    return SummaryWriter(folder)


# -- writing files -----------------------------------------------------------------------------

def write_file(path, write):
    """write(f) into the binary file path, atomically (fileio.atomic_write: the old file stays
    whole until the new one is complete); a UserError naming path if it cannot be written.
    The scripts print their table before they write it, so such an error loses no results."""
    try:
        atomic_write(path, write)
    except OSError as e:  # a full disk, a folder gone read-only since the start
        raise UserError(f"could not write {path} ({e.strerror or e}); the table is printed above: "
                        "free some space or make the folder writable, and run again") from None


def write_text(path, text):
    """text (UTF-8) at path, atomically (write_file)."""
    write_file(path, lambda f: f.write(text.encode("utf-8")))


def write_csv(path, rows, fieldnames):
    """rows (dicts) as CSV at path, atomically (write_file)."""
    buffer = io.StringIO(newline="")
    w = csv.DictWriter(buffer, fieldnames=fieldnames)
    w.writeheader()
    w.writerows(rows)
    write_text(path, buffer.getvalue())


def save_png(fig, path):
    """A matplotlib figure as a PNG at path, atomically (write_file)."""
    write_file(path, lambda f: fig.savefig(f, format="png", dpi=120))


def check_writable(prefix, suffixes, tensorboard, option):
    """One UserError now, before a long run, if the files prefix + suffix (".csv", ".md", ...)
    could not be written at its end: their folder is missing or read-only, or a folder is in
    the way of one of them; tensorboard: the TensorBoard folder prefix/ must be possible too.
    option: the setting that names the folder (e.g. "--out_dir"), for the message."""
    folder = os.path.dirname(prefix) or "."
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder, so the results could not be written there; use another {option}")
    for path in [prefix + suffix for suffix in suffixes]:
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder, so the results could not be written there; "
                            f"move it away or use another {option}")
    if tensorboard and os.path.exists(prefix) and not os.path.isdir(prefix):
        raise UserError(f"{prefix} is a file, so the TensorBoard scalars could not go into a folder of that "
                        "name; move it away or pass --tensorboard=False")
    try:  # a real file: os.access says yes to root even on a read-only disk
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_check.", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write into {folder} ({e.strerror or e}), where the results go; "
                        f"make it writable or use another {option}") from None
