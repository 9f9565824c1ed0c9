"""
Train a byte-level GPT (RoPE, no learned position embedding) on a text corpus.

GPU recipe (the tutorial's, about 3 minutes on one A100):
    python train.py config/train_shakespeare_char.py
CPU recipe (a few minutes on a laptop):
    python train.py config/train_shakespeare_char_cpu.py
Every global below can be overridden with --name=value, after the config files:
    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=True

Resuming from a checkpoint (--init_from=resume) has two intents:
  (a) continue an interrupted run on its original schedule, up to max_iters in all
      (iteration count, LR schedule, best val loss, optimizer, scaler, RNG, data position
      and XL memory are restored; xl_mem and kv_quant too, unless given, and the dataset unless
      given as a flag, --dataset=NAME: a recipe's config file names one too; no second warm-up):
    python train.py config/train_shakespeare_char.py --init_from=resume --resume_checkpoint_name=last
  (b) train a checkpoint for max_iters MORE iterations, e.g. with a longer context
      (a fresh schedule fitted to them: warm-up max_iters/10, at most warmup_iters, and the
      cosine down to min_lr at the end, unless --warmup_iters or --lr_decay_iters are given;
      the iteration count continues, and so does the best val loss unless the model,
      block_size or dataset changed, or batch_size, eval_iters, seed or eval_windows (other val batches)):
    python train.py config/train_shakespeare_char.py --init_from=resume --block_size=1024 --max_iters=200
  resume_mode='auto' picks (a) when max_iters is beyond the checkpoint's iteration, else (b),
  but only evaluates a finished run resumed with its own max_iters (as nanoGPT's loop stops there);
  --resume_mode=continue or --resume_mode=finetune forces one.
Ctrl-C (or SIGTERM) stops after the current iteration and writes last.pt; the line it prints goes on
  from there: (a) exactly, (b) with a fresh schedule for the iterations left.
Only compute the val loss of a checkpoint (writes nothing; --eval_only=True, or --max_iters=0 alone, does the same):
    python train.py config/train_shakespeare_char.py --init_from=resume --max_iters=0 --eval_interval=1
Several GPUs (DistributedDataParallel; gloo instead of nccl on CPUs), and several nodes:
    torchrun --standalone --nproc_per_node=4 train.py config/train_shakespeare_char.py --gradient_accumulation_steps=4
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 train.py ...
    (the same on the second node with --node_rank=1)
Watch the curves:
    tensorboard --logdir=out-shakespeare-char
"""
import quiet_start  # first: Ctrl-C during the slow imports below exits quietly
import math
import os
import shlex
import sys
import time
from contextlib import ExitStack

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import outdir
from checkpoint import save_checkpoint, unwrap
from configurator import configure
from kv.qat import check_qat, make_qat_caches
from kv.xl import load_memory_state, make_xl_memory, memory_bytes, memory_state, try_step
from loader import ByteLoader, dataset_paths, fixed_batches, not_text
from model import GPT, GPTConfig, MODEL_ARG_KEYS
from outdir import checkpoint_path
from plugins import import_function
from train_checks import check_settings, check_variant
from steps import (compile_probe, estimate_loss, evaluations_left, least_memory, not_finite_at_start, percent_done,
                   train_step)
from schedule import Schedule
from resume import (OBJECTIVE_KEYS, earlier_best, interrupted, later_last, only_evaluates, restore_training_state,
                    resume_run, rng_state, stopped_at_once, val_batches)
from devices import autocast_ctx, in_bytes, memory_available, start_device
from utils import (StopAfterStep, TensorBoard, UserError, compile_or_eager, clock, has_module, project_file,
                   run_main, stop_on_sigterm)

quiet_start.done()

# -----------------------------------------------------------------------------
# default config: the tutorial's GPU recipe for tiny-shakespeare
# I/O
out_dir = "out"  # checkpoints (ckpt.pt = best val loss, last.pt = latest) and TensorBoard events
eval_interval = 250  # evaluate train/val loss every this many iterations
eval_iters = 200  # batches per loss estimate (a fixed set, so evaluations are comparable)
eval_windows = "auto"  # those batches: random (a window of its own per row and batch), rows (each row continues the text: what XL memory needs), auto (rows with xl_mem, else random)
log_interval = 10  # print, log to TensorBoard and write last.pt every this many iterations
last_save_budget = 0.1  # last.pt is skipped at a log step if writing it would take more than this fraction of the time
eval_only = False  # evaluate once and exit, writing nothing
always_save_checkpoint = False  # write ckpt.pt at every evaluation, not only when val loss improves
init_from = "scratch"  # 'scratch' or 'resume' (from out_dir/resume_checkpoint_name)
overwrite = False  # let a run from scratch replace the checkpoints already in out_dir (otherwise it is refused)
resume_checkpoint_name = "ckpt"  # 'ckpt', 'ckpt.pt', 'last' or 'last.pt'
resume_mode = "auto"  # 'continue' | 'finetune' | 'auto' (see the docstring)
tensorboard = True  # write TensorBoard scalars into out_dir
# data
dataset = "shakespeare_char"  # data/<dataset>/train.txt and val.txt, or the path of a folder holding them (./mydata: a slash)
gradient_accumulation_steps = 1  # micro-batches per optimizer step, over all DDP ranks together
batch_size = 64  # rows per micro-batch
block_size = 256  # bytes per row (the training context length)
reset_prob = 0.1  # probability that a row jumps to a random place in the text at each step
xl_mem = 0  # TransformerXL memory: attend to the last xl_mem tokens of earlier batches of the same row (0 = off)
xl_update = ""  # "package.module:function" replacing kv.xl.xl_step, the XL memory step (exercise 2)
kv_quant = "none"  # quantization-aware training: K/V pass through this cache format (int8, int4, int2, ...; see kv/qat.py)
kv_quant_group = 32  # with kv_quant int4/int2: values per group, as the inference option
kv_quant_keys = "channel"  # int4/int2 keys per 'channel' (the quantized cache's layout) or per 'token' (the evicting cache's)
# model (architecture keys n_layer, n_head, n_embd, bias come from the checkpoint on resume)
n_layer = 6  # transformer blocks
n_head = 6  # attention heads per block
n_embd = 384  # model width
dropout = 0.2  # dropout probability (a resume restores the RNG, so it continues exactly either way)
bias = False  # biases in Linear and LayerNorm layers
attention = "softmax"  # attention kind: softmax (SDPA), naive (written out), linear, or package.module:function (attention.py)
n_kv_head = 0  # K/V heads for grouped-query attention (0 = n_head)
window = 0  # local attention window in bytes (0 = unbounded)
global_layers = ""  # comma-separated layers that keep global attention when window > 0
kv_share = 1  # neighbouring layers sharing one K/V cache
rope = True  # rotary position embedding on q and k
linear_layers = ""  # comma-separated layers using linear attention
linear_norm = "layernorm"  # output normalisation of linear attention
# AdamW optimizer
learning_rate = 1e-3  # peak learning rate
max_iters = 5000  # total iterations (on resume: see resume_mode)
weight_decay = 1e-1  # applied to 2-D weights only
beta1 = 0.9  # AdamW beta1
beta2 = 0.99  # AdamW beta2
grad_clip = 1.0  # clip gradient norm to this value (0.0 = no clipping)
# learning rate schedule: linear warm-up, then cosine decay to min_lr
decay_lr = True  # False keeps learning_rate after the warm-up
warmup_iters = 100  # warm-up iterations
lr_decay_iters = 5000  # iteration at which min_lr is reached
min_lr = 1e-4  # final learning rate
# system
device = ""  # 'cpu', 'cuda', 'cuda:1', 'mps'; '' or 'auto' = the best available
dtype = ""  # 'float32', 'bfloat16', 'float16'; '' = bfloat16 where supported (GPUs, CPUs with bf16 instructions), float16 on older GPUs, float32 elsewhere
compile = False  # torch.compile the model (eager, with a warning, where it fails; RESULTS.md, "Speed", for where it pays)
threads = 0  # torch's CPU threads (0 = automatic: OMP_NUM_THREADS, else the CPUs not busy with other work)
backend = ""  # torch.distributed backend under torchrun: 'nccl' or 'gloo'; '' = nccl on CUDA, gloo on CPU
seed = 1337  # seed of the model init, dropout and data order
# -----------------------------------------------------------------------------

PROGRESS = {}  # this run's schedule's origin and the last.pt it wrote (last_written), for the line Ctrl-C prints


def main():
    held = ExitStack()  # out_dir's lock (outdir.claim), released however training ends
    # SIGTERM before the loop (start-up, data, compiling) stops at once, as Ctrl-C (torchrun stops its own)
    held.enter_context(stop_on_sigterm(enabled=int(os.environ.get("RANK", -1)) == -1))
    try:
        train(held)
        if dist.is_initialized():
            dist.barrier()  # no rank leaves while rank 0 still writes a checkpoint
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the training loop, or a second one in it: at once
        stopped_at_once(out_dir, PROGRESS.get("last_written"), PROGRESS.get("origin"))
        raise
    finally:
        held.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def train(held):
    defaults = {k: globals()[k] for k in (*MODEL_ARG_KEYS, *OBJECTIVE_KEYS)}
    # under torchrun (RANK, LOCAL_RANK and WORLD_SIZE set): one process per GPU, or per CPU share
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0  # rank 0 alone prints, logs to TensorBoard and writes checkpoints
    t_begin = time.time()
    if not master:
        sys.stdout = open(os.devnull, "w")
    given = set()  # the settings a flag or a config file sets (configure fills it)
    config = configure(globals(), sys.argv[1:], given=given)
    if isinstance(dataset, str) and ("/" in dataset or os.sep in dataset):
        # a folder as the checkpoint records it: read from any directory later (sample, eval_kv, a resume)
        globals()["dataset"] = config["dataset"] = os.path.abspath(dataset)
    check_settings(globals(), world_size)
    evaluates = init_from == "resume" and only_evaluates(  # a finished run, resumed as it was: nothing written
        checkpoint_path(out_dir, resume_checkpoint_name, "resume_checkpoint_name"), resume_mode, max_iters)
    if master and not eval_only and max_iters > 0 and not evaluates:  # a run that trains: out_dir must be usable
        held.enter_context(outdir.claim(out_dir, fresh=init_from == "scratch", overwrite=overwrite))
    micro_steps = gradient_accumulation_steps // world_size  # this rank's share
    xl_fn = import_function(xl_update, "xl_update") if xl_update else None
    xl_name = f"--xl_update={xl_update}" if xl_update else None  # errors in what xl_fn returns name it
    dev, dt = start_device(device, dtype, threads, backend, ddp, local_rank, world_size, micro_steps)
    device_type = dev.split(":")[0]
    torch.manual_seed(seed + rank)  # rank's own dropout; DDP gives every rank rank 0's initial weights
    ctx = autocast_ctx(dev, dt)
    # model, optimizer and the iteration range of this run
    if init_from == "scratch":
        train_path, val_path = dataset_paths(dataset)
        if master and (note := not_text(train_path)):
            print(note)
        model_args = {k: config[k] for k in MODEL_ARG_KEYS}
        model = GPT(GPTConfig(**model_args)).to(dev)
        ckpt, ckpt_path, mode, start_iter, end_iter, origin = None, None, "scratch", 0, max_iters, 0
        best_val_loss, changed = float("inf"), []
        if eval_only or max_iters == 0:
            held_here = [n for n in ("ckpt", "last") if os.path.isfile(os.path.join(out_dir, n + ".pt"))]
            how = "--init_from=resume" + (" --resume_checkpoint_name=last" if held_here[:1] == ["last"] else "")
            print(f"{'eval_only' if eval_only else 'max_iters=0'}: the new, untrained model is evaluated once; "
                  "nothing is trained or written" + (f" (to evaluate {os.path.join(out_dir, held_here[0])}.pt instead: "
                                                     f"{how})" if held_here else ""))
    else:
        r = resume_run(globals(), config, given, defaults, dev, world_size)
        model, ckpt, ckpt_path, model_args, train_path, val_path = (
            r.model, r.ckpt, r.ckpt_path, r.model_args, r.train_path, r.val_path)
        mode, start_iter, end_iter, origin = r.mode, r.start_iter, r.end_iter, r.origin
        best_val_loss, changed = r.best_val_loss, r.changed
    PROGRESS.update(origin=origin)
    xl_state = None  # the XL memory a resumed run goes on with
    config.update(model_args)  # the checkpoint's config records the model actually trained
    n_params = model.get_num_params()
    print(f"model: {n_params / 1e6:.2f}M parameters, {model_args}")
    check_qat(model, kv_quant, kv_quant_group, kv_quant_keys == "channel")  # before the first evaluation
    check_variant(model.config, init_from == "scratch", xl_mem, block_size)
    need = least_memory(model.config, batch_size, block_size, eval_iters, training=not eval_only)
    free = memory_available(dev)
    if free is not None and need > free:
        raise UserError(f"batch_size={batch_size} x block_size={block_size} (and eval_iters={eval_iters} fixed batches "
                        f"a split) need at least {in_bytes(need)} on {dev}, and {in_bytes(free)} is free: lower "
                        "--batch_size (--gradient_accumulation_steps keeps the tokens per iteration), --block_size or "
                        "--eval_iters")

    tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
    writes = not eval_only and end_iter > start_iter  # an evaluation alone writes nothing
    set_aside = later_last(out_dir, ckpt_path, start_iter) if writes and master and ckpt is not None else None
    eval_set = val_batches(globals())  # what the val batches are drawn from
    best_aside = earlier_best(out_dir, model_args, block_size, dataset, eval_set) if writes and master and ckpt is not None \
        else None
    if writes and master:
        outdir.check_space(out_dir, model, memory_bytes(model, batch_size, xl_mem) if xl_mem else 0,
                           kept=(set_aside is not None) + (best_aside is not None))
    if xl_fn is not None and not xl_mem:  # (xl_mem as a resume goes on with it: the checkpoint's, or given)
        raise UserError(f"--xl_update={xl_update} replaces the XL memory's step, and this run keeps no XL memory "
                        "(xl_mem=0): add --xl_mem=N (e.g. --xl_mem=256), or it is never called")
    if xl_fn is not None:  # the user's XL step, tried now, not after the first evaluation
        try_step(model, xl_mem, xl_fn, xl_name, dev)
    if writes and device_type == "cpu" and n_params > 5e6:  # e.g. `python train.py`, the GPU recipe
        print(f"note: a {n_params / 1e6:.1f}M-parameter model trains for hours on a CPU; the CPU recipe "
              "trains in minutes: python train.py config/train_shakespeare_char_cpu.py")
    # each rank reads its own rows. A resume restores rank 0's rows (the checkpoint holds its
    # loader); the other ranks start new rows, seeded by the iteration so none replays its first batches
    rank_seed = seed + rank + (world_size * start_iter if rank > 0 else 0)
    if writes:
        # numbered as the log lines count them: "iter N" once N iterations are done
        print(f"training iterations {start_iter + 1}..{end_iter}, {tokens_per_iter:,} tokens per iteration")
        schedule = Schedule.from_settings(globals())  # (a fine-tune's is fitted to its iterations: resume_run)
        if master and (note := schedule.run_note(start_iter, end_iter, origin, mode)):
            print(note)
        optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
        scaler = torch.amp.GradScaler("cuda", enabled=(device_type == "cuda" and dt == "float16"))
        loader = ByteLoader(train_path, block_size, batch_size, reset_prob=reset_prob, seed=rank_seed, device=dev)
        if ckpt is not None:
            rows_kept = restore_training_state(ckpt, mode, optimizer, scaler, loader if master else None,
                                               (batch_size, block_size), dataset)
            if xl_mem and rows_kept and not changed and ckpt["config"].get("xl_mem") == xl_mem:
                xl_state = ckpt.get("xl_memory")  # the rows go on: so does what they remember
            if xl_mem and master and writes:
                print("XL memory restored: the rows go on with what they remembered" if xl_state is not None else
                      "note: XL memory starts empty (the rows, the model or xl_mem are not the checkpoint's)")
            if not master:
                torch.manual_seed(rank_seed)
    del ckpt  # free its memory before training

    def new_memory():
        """What a training step passes beside the batch: the XL memory (each layer's detached K/V
        of the rows' previous batches, kv/xl.py), or for quantization-aware training stateless
        caches that fake-quantize K/V (kv/qat.py), or None."""
        if xl_mem and writes:
            return make_xl_memory(unwrap(model), batch_size, xl_mem, xl_fn, xl_name)
        return make_qat_caches(unwrap(model), kv_quant, kv_quant_group, kv_quant_keys == "channel")

    if compile:
        print("compiling the model (the first call of each kind of step takes a while)...")
        t0, eager = time.time(), model
        model = compile_or_eager(model, lambda m: compile_probe(m, dev, ctx, (batch_size, block_size), new_memory()))
        if model is not eager:
            print(f"compiled the training step in {time.time() - t0:.1f} s (evaluation compiles at its first call)")
    if ddp:
        # the only buffers are constant rotary tables: no need to send them at every forward
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, forward_sync_buffers=False)
    # the same batches on every rank: a val loss means the same whatever the number of processes
    # (a resume under another world size compares its best with the one recorded)
    eval_sets = {split: fixed_batches(path, block_size, batch_size, eval_iters, seed, dev, eval_set["eval_windows"])
                 for split, path in (("train", train_path), ("val", val_path))}
    use_tb = writes and tensorboard and master and has_module("tensorboard", "no TensorBoard scalars are written")
    tb = TensorBoard(out_dir if use_tb else None, purge_step=start_iter)

    # --overwrite=True: the earlier run's checkpoints go when this run writes its first one (a
    # failure or a Ctrl-C before then leaves them)
    replaces = writes and master and init_from == "scratch" and overwrite

    def save(name):
        nonlocal set_aside, best_aside, replaces
        diverged(lambda: not all(bool(torch.isfinite(p).all()) for p in model.parameters()), name)
        if not master:
            return 0.0
        if replaces:
            outdir.remove_earlier(out_dir)
            replaces = False
        if name == "last.pt" and set_aside:  # the later last.pt of the run resumed moves aside, not away
            os.replace(os.path.join(out_dir, "last.pt"), set_aside)
            set_aside = None
        if name == "ckpt.pt" and best_aside:  # so does the best of the model before a change
            os.replace(os.path.join(out_dir, "ckpt.pt"), best_aside)
            best_aside = None
        t0 = time.time()
        os.makedirs(out_dir, exist_ok=True)
        save_checkpoint(os.path.join(out_dir, name), model, optimizer, model_args, config,
                        iter_num, best_val_loss, scaler=scaler,
                        extra={"rng": rng_state(), "loader": loader.state_dict(),
                               **({"xl_memory": memory_state(memory)} if xl_mem else {})})
        if name == "last.pt":
            PROGRESS["last_written"] = iter_num
        return time.time() - t0

    def diverged(test, name):
        """Stop (one error, nothing written) once the loss or the weights are nan or inf."""
        if test():
            kept = [n for n in ("ckpt.pt", "last.pt") if os.path.isfile(os.path.join(out_dir, n))]
            before = f"; {' and '.join(kept)} in {out_dir} hold{'s' * (len(kept) == 1)} the run before" if kept else ""
            raise UserError(f"training diverged by iteration {iter_num} (the loss or the weights are nan or inf), so "
                            f"{name} was not written{before}: lower --learning_rate (now {learning_rate:g}) or keep "
                            "--grad_clip on, and train again")

    def evaluate():
        nonlocal best_val_loss, best_iter
        t0 = time.time()
        losses = estimate_loss(model, eval_sets, ctx, xl_mem, xl_fn, xl_name, quiet=not master)
        if ddp:  # (every rank evaluated the same batches: the mean makes them agree to the bit)
            mean = torch.tensor(list(losses.values()), device=dev)
            dist.all_reduce(mean)
            losses = dict(zip(losses, (mean / world_size).tolist()))
        if not all(map(math.isfinite, losses.values())):
            if iter_num == start_iter:  # no step taken yet: the forward pass itself gives nan or inf
                raise UserError(not_finite_at_start(losses, iter_num, attention, xl_update, kv_quant))
            diverged(lambda: True, "ckpt.pt")
        line = f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        if "val_mem" in losses:
            line += f", val loss with memory {losses['val_mem']:.4f}"
            tb.add_scalar("val/loss_mem", losses["val_mem"], iter_num)
        # (a changed model's best starts at its first evaluation, the weights resumed: a fine-tune
        # that only makes them worse leaves ckpt.pt holding those, not its worse end)
        improved = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        best_iter = iter_num if improved else best_iter
        tb.add_scalar("train/loss", losses["train"], iter_num)
        tb.add_scalar("val/loss", losses["val"], iter_num)
        # ckpt.pt: at a better val loss (or each evaluation, always_save_checkpoint). A resume's
        # first evaluation writes it too when the model resumed (say last.pt) beats the best recorded
        first = iter_num == start_iter
        if writes and (improved and (not first or init_from == "resume") or always_save_checkpoint and not first):
            line += f", ckpt.pt written in {save('ckpt.pt') * 1000:.0f}ms"
        print(line, flush=True)
        return time.time() - t0

    # built before the first evaluation, whose ckpt.pt (a resume's) saves the XL memory
    memory = new_memory()
    if xl_state is not None and memory is not None:
        load_memory_state(memory, xl_state)
    iter_num, best_iter = start_iter, None
    eval_times = []  # seconds per evaluation, a ckpt.pt write included: the ETA adds those to come
    if eval_only or (iter_num - origin) % eval_interval == 0 or iter_num == end_iter:
        eval_times.append(evaluate())
    if not writes:
        return

    model.train()
    t_mark, steps_since_mark = time.time(), 0  # for ms/iter and tokens/s, pauses excluded
    t_loop = t_mark  # for the ETA: the time of the steps (last.pt writes included, evaluations not)
    save_dt, last_save_end, last_saved_iter, throttle_noted = 0.0, time.time(), None, False
    stop = held.enter_context(StopAfterStep(enabled=not ddp))
    while iter_num < end_iter and not stop.asked:
        lr = schedule.lr(iter_num - origin)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_loss = train_step(model, optimizer, scaler, loader, ctx, micro_steps, grad_clip, memory, ddp)
        iter_num += 1
        steps_since_mark += 1

        if (iter_num - origin) % eval_interval == 0 or iter_num == end_iter:
            eval_times.append(evaluate())
            t_mark, t_loop = t_mark + eval_times[-1], t_loop + eval_times[-1]
        if iter_num % log_interval == 0:
            if ddp:  # the loss of the whole batch, all ranks' micro-steps
                dist.all_reduce(batch_loss)
                batch_loss /= world_size
            lossf = batch_loss.item()  # waits for the GPU
            diverged(lambda: not math.isfinite(lossf), "last.pt")
            elapsed = time.time() - t_mark
            ms_per_iter = 1000 * elapsed / steps_since_mark
            tokens_per_s = tokens_per_iter * steps_since_mark / elapsed
            eta = (time.time() - t_loop) / (iter_num - start_iter) * (end_iter - iter_num) + \
                sum(eval_times) / max(len(eval_times), 1) * evaluations_left(iter_num, origin, end_iter, eval_interval)
            line = (f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, "
                    f"{ms_per_iter:.1f}ms/iter, {tokens_per_s:,.0f} tokens/s, "
                    f"{percent_done(iter_num, origin, end_iter)}% done, ETA {clock(eta)}")
            # last.pt at every log step, unless writing it would take more than
            # last_save_budget of the time (a large model, a slow disk)
            if time.time() - last_save_end >= save_dt * (1 / last_save_budget - 1):
                save_dt = save("last.pt")
                last_save_end, last_saved_iter = time.time(), iter_num
                line += f", last.pt written in {save_dt * 1000:.0f}ms"
                if not throttle_noted and save_dt > last_save_budget * elapsed:
                    throttle_noted = True
                    print(f"note: writing last.pt takes {save_dt * 1000:.0f}ms; it is written at most "
                          f"every {save_dt / last_save_budget:.2f}s (last_save_budget={last_save_budget})")
            print(line, flush=True)
            tb.add_scalar("train/instant_loss", lossf, iter_num)
            tb.add_scalar("lr", lr, iter_num)
            tb.add_scalar("tokens_per_s", tokens_per_s, iter_num)
            t_mark, steps_since_mark = time.time(), 0

    if iter_num > start_iter and last_saved_iter != iter_num:
        save("last.pt")  # always, so that a resume continues exactly from here
    tb.close()
    if stop.asked and iter_num < end_iter:  # (asked in the last iteration: the run is done)
        interrupted(out_dir, iter_num, start_iter, origin, end_iter, stop.asked)
    best = f"at iteration {best_iter}" if best_iter is not None else "from before this run (not improved)"
    done = iter_num - start_iter
    print(f"done: {done} iteration{'s' if done != 1 else ''} in {clock(time.time() - t_begin)}; best val loss "
          f"{best_val_loss:.4f} {best}; checkpoints: " + ", ".join(f"{os.path.join(out_dir, n)} ({what})" for n, what in
          (("ckpt.pt", "best val loss"), ("last.pt", "latest")) if os.path.isfile(os.path.join(out_dir, n))))
    print(f"next: python {project_file('sample.py')} {shlex.join(sample_args(unwrap(model).config))}")

def sample_args(c):
    """sample.py's flags for this run's model (GPTConfig c)."""
    # sample.py's default cache is unbounded: past block_size bytes a global softmax layer sees more
    # history than it was trained on and drifts into noise (XL memory, linear layers and local
    # layers whose window is within block_size do not)
    drifts = not xl_mem and any(not c.keeps_state(i) and (not c.is_local(i) or c.window > block_size)
                                for i in range(c.n_layer))
    args = [f"--out_dir={out_dir}"] + ([f"--kv_window={block_size}"] if drifts else [])
    args += [f"--attention={c.attention}"] if ":" in c.attention else []  # sample.py runs a plug-in only if named
    if kv_quant != "none":  # the cache format the model was trained through (kv/qat.py: every token quantized)
        args += [f"--kv_quant={kv_quant}", "--kv_quant_residual=0"]
        args += [f"--kv_quant_group={kv_quant_group}"] if kv_quant_group != 32 else []
        args += [f"--kv_quant_keys={kv_quant_keys}"] if kv_quant_keys != "channel" else []
    return args


if __name__ == "__main__":
    run_main(main)
