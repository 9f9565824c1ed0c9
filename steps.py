"""
What one iteration of train.py does, apart from the loop around it: an optimizer step over
the micro-batches (bench.py times this very function), the evaluation of the fixed batches,
the dummy step that makes torch.compile compile before the loop, and the memory they need at
the least (checked before any work).

    loss = train_step(model, optimizer, scaler, loader, ctx, micro_steps, grad_clip=1.0)
    losses = estimate_loss(model, eval_sets, ctx, mem_len=256)   # {"train": .., "val": .., "val_mem": ..}
"""
import math
import sys
import time
import warnings
from contextlib import nullcontext

import torch

from checkpoint import unwrap
from kv.xl import make_xl_memory
from model import loss_fn


def train_step(model, optimizer, scaler, loader, ctx, micro_steps, grad_clip=1.0, memory=None, ddp=False):
    """One optimizer step over micro_steps micro-batches of loader; returns this rank's mean
    loss as a tensor (reading it would wait for the GPU). grad_clip: the gradient norm's bound
    (0 = none). memory: the XL memory, or None."""
    batch_loss = 0.0
    for micro in range(micro_steps):
        x, y, restarted = loader.next()
        # DDP all-reduces the gradients in the backward of the last micro-step only
        with model.no_sync() if ddp and micro < micro_steps - 1 else nullcontext():
            with ctx:
                if memory is not None:
                    restart_rows(memory, restarted)
                logits, _ = model(x, memory)
                loss = loss_fn(logits, y) / micro_steps
            scaler.scale(loss).backward()
        batch_loss = batch_loss + loss.detach()
    if grad_clip > 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return batch_loss


def compile_probe(model, dev, ctx, shape, memory=None):
    """One forward and backward of a dummy batch of shape (batch_size, block_size), so that
    torch.compile compiles (or fails) now. memory: a throwaway XL memory or QAT caches, as
    training will pass its own (the path a training step takes, fake quantization included)."""
    inner = getattr(model, "_orig_mod", model)
    if getattr(getattr(inner, "config", None), "rope", False):
        # the RoPE table the trace will find at every later call: traced without it, the first
        # training step traced the model again (its guard: the table was None), seconds counted
        # in the first interval's ms/iter
        inner._rope(0, shape[1])
    try:
        with ctx, warnings.catch_warnings():
            # (inductor's C++ code generator warns of QAT's bfloat16 values beside float16 scales in
            # one loop: both are read as stored)
            warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")
            logits, _ = model(torch.zeros(*shape, dtype=torch.long, device=dev), memory)
        logits.float().mean().backward()
    finally:
        model.zero_grad(set_to_none=True)


def least_memory(c, batch_size, block_size, eval_iters, training=True):
    """Bytes a run of a model (GPTConfig c) needs at the least on its device: the fixed eval
    batches of both splits (x and y int64, a flag a row, and 1 KB for their three tensors'
    bookkeeping: 1.8 KB measured on a CPU), and for one micro-batch the float32
    logits and their gradient (training) and, per layer, 14 n_embd values a token at 2 bytes,
    fewer than autograd keeps for the backward pass (the residual, both LayerNorms, q, k, v,
    the attention's output, the MLP's 4 n_embd twice). A floor for refusing, not a forecast."""
    tokens = batch_size * block_size
    eval_batches = 2 * eval_iters * (batch_size * (2 * block_size * 8 + 1) + 1024)
    if not training:
        return eval_batches + tokens * c.vocab_size * 4
    return eval_batches + tokens * (2 * c.vocab_size * 4 + c.n_layer * 14 * c.n_embd * 2)


def evaluations_left(it, origin, end_iter, eval_interval):
    """How many evaluations train.py runs after iteration it: one every eval_interval
    iterations counted from origin, and one at end_iter (the ETA counts their time too)."""
    if it >= end_iter:
        return 0
    due = (end_iter - origin) // eval_interval - (it - origin) // eval_interval
    return due + ((end_iter - origin) % eval_interval != 0)


def percent_done(it, origin, end_iter):
    """The log line's "% done" after iteration it of a schedule from origin to end_iter, rounded
    down: 100 only at its end (a long continued run was "100% done" with iterations left)."""
    return 100 * (it - origin) // max(end_iter - origin, 1)


def not_finite_at_start(losses, iter_num, attention, xl_update, kv_quant):
    """The error for a loss that is nan or inf before any training step: the model's forward
    pass computes it, most likely a plug-in's code (not the learning rate: nothing was learned)."""
    bad = ", ".join(f"{k} loss {v}" for k, v in losses.items() if not math.isfinite(v))
    plugins = [f"--{k}={v}" for k, v in (("attention", attention), ("xl_update", xl_update), ("kv_quant", kv_quant))
               if ":" in v]
    which = (f"the plug-in {' or '.join(plugins)} is where to look (python -m exercises.check tries an exercise's, "
             "with --module= for yours)") if plugins else "the model or its settings produce it"
    return (f"the model's {bad} at iteration {iter_num}, before this run took a training step: its forward pass "
            f"gives nan or inf, so {which}; nothing was written")


def restart_rows(memory, restarted):
    """Rows the loader moved to another place in the text forget their memory."""
    for state in {id(s): s for s in memory}.values():
        state.restart(restarted)


@torch.no_grad()
def estimate_loss(model, eval_sets, ctx, mem_len=0, xl_fn=None, xl_name=None, quiet=False):
    """Mean loss over each split's fixed batches; with mem_len, also the val loss with XL
    memory carried over the consecutive val batches ("val_mem"). Shows progress when slow
    (unless quiet)."""
    model.eval()
    tty = sys.stderr.isatty()  # a terminal gets one updated line, a log file a line every 10 s
    out, t0, shown = {}, time.time(), 0.0
    runs = [(split, split, 0) for split in eval_sets] + ([("val_mem", "val", mem_len)] if mem_len else [])
    for name, split, mem in runs:
        batches = eval_sets[split]
        memory = make_xl_memory(unwrap(model), batches[0][0].size(0), mem, xl_fn, xl_name) if mem else None
        losses = torch.zeros(len(batches))
        for i, (x, y, restarted) in enumerate(batches):
            with ctx:
                if memory is not None:
                    restart_rows(memory, restarted)
                logits, _ = model(x, memory)
                losses[i] = loss_fn(logits, y).item()
            now = time.time()
            if not quiet and now - t0 > 3.0 and now - shown > (0.5 if tty else 10.0):
                progress = f"evaluating: {name} batch {i + 1}/{len(batches)}"
                print("\r" + progress if tty else progress, end="" if tty else "\n", file=sys.stderr, flush=True)
                shown = now
        out[name] = losses.mean().item()
    if shown and tty:
        print("\r" + " " * 40 + "\r", end="", file=sys.stderr, flush=True)
    model.train()
    return out
