"""
The KV study's outputs (kv_study.py): its rows, every variant's settings judged against the
base, as frontier.csv, frontier.md (the table and the answer: the largest reduction within
1% and 3% of the yardstick, with its commands), frontier.png and TensorBoard scalars.

    from kv.study_report import write_frontier
    print(write_frontier(rows, "out/kv_study/frontier", "my study", yardstick="strict"))
"""
import os
import shlex

import torch

from kv.report import frontier, save_png, signed_pct, tensorboard_writer, write_csv, write_text
from utils import has_module


def write_frontier(rows, prefix, title, yardstick="strict", use_tb=True, show=None):
    """prefix.csv, .md (the table and the answer), .png, and TensorBoard scalars (use_tb), each
    file atomically; returns the markdown. show(markdown), if given, comes first, so a file
    that cannot be written (a UserError naming it) loses no results."""
    md = markdown(rows, title, yardstick)
    if show is not None:
        show(md)
    write_csv(prefix + ".csv", rows, list(dict.fromkeys(k for r in rows for k in r)))
    write_text(prefix + ".md", md)
    if has_module("matplotlib", "no frontier.png is drawn"):
        plot(rows, prefix + ".png", title)
    if use_tb and has_module("tensorboard", "no TensorBoard scalars are written"):
        with tensorboard_writer(prefix) as tb:
            for r in rows:
                tb.add_scalar(f"kv_study/{r['variant']}/bpb_vs_log2_peak_bits", r["bpb"],
                              round(1000 * torch.log2(torch.tensor(float(r["kv_bits_peak"]))).item()))
            tb.add_text("kv_study/table", md)
    return md


def best_within(rows, pct):
    """The row holding the fewest bits within pct% of its yardstick (of equal bits, the one that loses least)."""
    ok = [r for r in rows if r["delta_pct"] <= pct]
    return max(ok, key=lambda r: (r["x_smaller"], -r["delta_pct"])) if ok else None


def markdown(rows, title, yardstick="strict"):
    """The frontier table, what its columns mean (yardstick: kv_study's --yardstick), and the
    largest reduction within 1% and 3% of the yardstick with the commands that reproduce it."""
    front = frontier(rows)
    b = rows[0]
    lines = [f"### {title}", "", "| variant | setting | peak KV bits/stream | x smaller | bits/byte | vs base "
             "| vs yardstick | frontier |", "|---|---|---:|---:|---:|---:|---:|:---:|"]
    for i, r in sorted(enumerate(rows), key=lambda t: -t[1]["kv_bits_peak"]):
        lines.append(f"| {r['variant']} | {r['setting']} | {r['kv_bits_peak']:,} | {r['x_smaller']:.1f} | "
                     f"{r['bpb']:.4f} | {signed_pct(r.get('delta_base_pct', r['delta_pct']))} | "
                     f"{signed_pct(r['delta_pct'])} ({r.get('yardstick', 'base')}) | {'*' if i in front else ''} |")
    lines += ["", f"Baseline: {b['baseline']}: {b['bpb_base']:.4f} bits per byte, {b['kv_bits_peak_base']:,} peak KV "
              "bits per stream (x smaller = its peak / the row's; peak = the most a token-by-token decoder holds). "
              f"vs yardstick: the change in bits per byte against the plain multi-head model named (--yardstick="
              f"{yardstick}: the base for its own rows; for a fine-tuned row "
              + {"strict": "the worse for it of the base and base_ft, the base fine-tuned as long with nothing reduced",
                 "same_training": "base_ft, the base fine-tuned as long with nothing reduced",
                 "base": "the base"}[yardstick] + "). Within p%: at most p% worse than the yardstick (a row that "
              "does better counts too). In frontier.csv, delta_pct is the change against the yardstick named in "
              "yardstick, delta_base_pct against the base (baseline, bpb_base); bpb_ref, kv_bits_peak_ref and kl_bits "
              "are against the reference of the row's own checkpoint."]
    if yardstick != "base" and not any(r["variant"] == "base_ft" for r in rows) \
            and any(r["variant"] != "base" for r in rows):  # (a fine-tuned row to judge)
        lines[-1] += (" No base_ft among the variants: every row is judged against the base, so a fine-tuned "
                      "row's change mixes the reduction with its extra training (add base_ft to --variants).")
    for pct in (1, 3):
        r = best_within(rows, pct)
        if r is None:
            lines += ["", f"Within {pct}% of the yardstick: no row."]
            continue
        yard = r.get("yardstick", "base")
        vs_base = "" if yard == "base" else f", {signed_pct(r.get('delta_base_pct', r['delta_pct']))} vs base"
        lines += ["", f"**Largest reduction within {pct}% of the yardstick: {r['x_smaller']:.1f}x** ({r['variant']}, "
                  f"{r['setting']}: {r['bpb']:.4f} bits per byte, {signed_pct(r['delta_pct'])} vs {yard}"
                  f"{vs_base}). Commands (eval_kv's "
                  "\"vs baseline\" is the change against the base):", "",
                  *(["    " + r["train_command"]] if r["train_command"] else []), "    " + again(r)]
    return "\n".join(lines) + "\n"


def again(r):
    """Row r's eval_kv command; after a training command, on the checkpoint that one trains
    (in <variant>_again, next to the study's own)."""
    if not r["train_command"]:
        return r["eval_command"]
    d = os.path.dirname(r["checkpoint"])
    for form in (d, d.replace(os.path.join(os.getcwd(), ""), "")):  # as kept, or as written from here (kv_study.here)
        old = shlex.quote(f"--out_dir={form}") + " "
        if old in r["eval_command"]:
            return r["eval_command"].replace(old, shlex.quote(f"--out_dir={form}_again") + " ", 1)
    return r["eval_command"]


def plot(rows, path, title):
    """bits per byte against log peak KV bits, a colour per variant, the frontier, the baseline
    (and base_ft when it is a yardstick) with +1% and +3% lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")  # a colour per variant (11 in the full study)
    for c, name in enumerate(names):
        rs = [r for r in rows if r["variant"] == name]
        ax.scatter([r["kv_bits_peak"] for r in rs], [r["bpb"] for r in rs], color=cmap(c % cmap.N),
                   marker="os^D"[c // cmap.N % 4], label=name, zorder=2)
    front = sorted(frontier(rows), key=lambda i: rows[i]["kv_bits_peak"])
    ax.plot([rows[i]["kv_bits_peak"] for i in front], [rows[i]["bpb"] for i in front], "-", color="black",
            lw=1, label="frontier", zorder=1)
    b = rows[0]
    ax.scatter([b["kv_bits_peak_base"]], [b["bpb_base"]], marker="*", s=200, color="black", label="baseline", zorder=3)
    lines = [(b["bpb_base"], ":", "base")]
    ft = [r for r in rows if r["variant"] == "base_ft" and "(reference)" in r["setting"]]
    if ft and any(r.get("yardstick") == "base_ft" for r in rows):  # the fine-tuned rows' yardstick
        ax.scatter([ft[0]["kv_bits_peak"]], [ft[0]["bpb"]], marker="*", s=200, color="gray", label="base_ft", zorder=3)
        lines.append((ft[0]["bpb"], "--", "base_ft"))
    for bpb, style, name in lines:  # +1% and +3% of each yardstick
        for pct in (1, 3):
            ax.axhline(bpb * (1 + pct / 100), color="gray", ls=style, lw=1, label=f"{name} +1%, +3%" if pct == 1 else None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("peak KV bits per stream (log scale)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
