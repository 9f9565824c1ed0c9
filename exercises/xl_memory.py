"""
Assignment 2: TransformerXL. Carry the attention state from one training batch to the next.

The data loader gives each batch row the text that follows the row's previous batch (check it
with `python gen_sample_data.py`). So a layer can attend, beyond its own block, to the keys
and values it computed for the same row at the previous steps: the model learns to use more
context than one block, while gradients still stop at the block boundary (truncated
backpropagation through time). The memory must stay bounded: at most mem_len tokens.

Try it (every softmax layer calls your function once per step, see kv.xl.XLMemory):
    python train.py config/train_shakespeare_char_cpu.py --out_dir=out-xl --block_size=64 --xl_mem=192 \
        --xl_update=exercises.xl_memory:xl_step
Check it:
    python -m exercises.check xl_memory
"""


def xl_step(mem_k, mem_v, mem_ok, k, v, mem_len):
    """One memory step of one layer.

    mem_k, mem_v (B, nkv, m, hs): keys and values remembered from the previous steps (m = 0
                 at the first step), oldest first.
    mem_ok       (B, m) bool: False where a row's memory belongs to another stretch of text
                 (the loader restarted that row), so its queries must not see it.
    k, v         (B, nkv, T, hs): this step's keys and values; they carry gradients.
    mem_len      the most tokens the memory may keep (>= 1).

    Return six things:
      keys, vals   (B, nkv, m + T, hs): what this step's queries attend over, memory first,
                   then this step's tokens (which must keep their gradient);
      key_ok       (B, m + T) bool: mem_ok, then True for every token of this step;
      new_k, new_v (B, nkv, min(mem_len, m + T), hs): the memory for the next step, the newest
                   tokens of keys/vals, cut off from the autograd graph;
      new_ok       (B, min(mem_len, m + T)) bool: key_ok of the tokens kept.
    keys, vals, new_k and new_v keep k's dtype (training under autocast hands you bfloat16).
    The rules the checker applies: exercises/README.md, "Assignment 2, rules".

    Hints: torch.cat along the token axis (dim 2 for K/V, dim 1 for the flags); slice the last
    mem_len; `.detach()`. Without detach the next step's backward runs into this step's graph:
    PyTorch fails ("backward through the graph a second time") or gradients leak into the past.
    The positions (RoPE) and the mask are the cache's business (kv.xl.XLMemory).
    """
    raise NotImplementedError("assignment 2 (TransformerXL): implement xl_step in exercises/xl_memory.py")
