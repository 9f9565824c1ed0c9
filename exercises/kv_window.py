"""
Assignment 1: bounded history. Which tokens may a sampling KV cache keep?

A model trained on 256-byte blocks has never seen a key farther than 255 positions from its
query. Sampled longer, it meets distances it never learned and the text falls apart. The fix
here: keep only the newest kv_window tokens in the cache (plus the first kv_sink tokens of
the text, which attention likes to park on: see StreamingLLM, arXiv 2309.17453).

Try it (the cache calls your function after every step, see kv.cache.TrimCache):
    python sample.py --out_dir=out-shakespeare-char --max_new_tokens=2000 \
        --kv_trim=exercises.kv_window:keep_recent --kv_window=256 --kv_sink=4
    # the CPU recipe's model (trained on 64 bytes):
    python sample.py --out_dir=out-shakespeare-char-cpu --max_new_tokens=2000 \
        --kv_trim=exercises.kv_window:keep_recent --kv_window=64 --kv_sink=4
Check it:
    python -m exercises.check kv_window
"""


def keep_recent(k, v, pos, kv_window, kv_sink=0):
    """Choose what the cache keeps.

    k, v      (B, nkv, S, hs): the cached keys and values, oldest first; the newest token of
              this step is the last one. Keys are already RoPE-rotated at their own positions,
              so dropping tokens never requires re-rotating the ones that stay.
    pos       (S,) long: the position in the text of each cached token, increasing. After the
              first trim it has holes (e.g. 0, 1, 2, 3, 60, 61, ...).
    kv_window the number of newest tokens to keep (>= 1).
    kv_sink   keep also every token at a text position < kv_sink (0 = none).

    Return (k, v, pos) of the kept tokens, in the same order (oldest first), with the same
    dtypes: at most kv_window + kv_sink of them, and all of them when S <= kv_window.
    The rules the checker applies: exercises/README.md, "Assignment 1, rules".

    Hints: the newest position is pos[-1]; a boolean mask over the S axis selects the same
    tokens in k, v and pos (k[:, :, keep]).
    """
    raise NotImplementedError("assignment 1 (bounded history): implement keep_recent in exercises/kv_window.py")
