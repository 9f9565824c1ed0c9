"""
Assignment 4b: evict tokens from the KV cache by the attention they receive.

Most cached tokens get almost no attention. Heavy-Hitter Oracle (H2O, arXiv 2306.14048) keeps
a fixed budget of tokens per head: the first few (attention sinks), the most recent ones, and
the "heavy hitters", the tokens with the largest attention summed over every query so far.
The cache (kv.evict.EvictKVCache) computes the attention the naive way to read those sums; you
decide which tokens are worth keeping.

Try it (the cache keeps kv_budget tokens per layer and head, here a quarter of the 256 the
model was trained to see; --chunk=1 decodes byte by byte, as sampling does):
    python eval_kv.py --out_dir=out-shakespeare-char --stream_len=1024 --chunk=1 --kv_window=256 --kv_sink=4 \
        --kv_evict=exercises.kv_evict:priority --kv_budget=64 --kv_recent=16
    # the CPU recipe's model (trained on 64 bytes): a quarter of its 64
    python eval_kv.py --out_dir=out-shakespeare-char-cpu --stream_len=1024 --chunk=1 --kv_window=64 --kv_sink=4 \
        --kv_evict=exercises.kv_evict:priority --kv_budget=16 --kv_recent=4
Check it:
    python -m exercises.check kv_evict
"""


def priority(scores, pos, seen, kv_sink, kv_recent):
    """Rank the cached tokens of every head: the cache keeps the highest ranked, up to its budget.

    scores    (B, nkv, n) float: the attention each cached token has received so far, summed
              over the queries (and the query heads that share the KV head).
    pos       (B, nkv, n) long: each token's position in the text (heads keep different tokens,
              in no particular order).
    seen      int: tokens read so far, counting the token of this step (at position seen - 1),
              which always stays (the cache does not rank it; with a quantized cache, not the
              kv_quant_residual newest either).
    kv_sink   the tokens at positions < kv_sink must always stay.
    kv_recent the kv_recent newest tokens (positions >= seen - kv_recent) must always stay.

    Return (B, nkv, n) float priorities: the kv_sink first and kv_recent newest tokens above
    every other (float("inf") does it), the others ranked by how much they are used. Do not
    modify the inputs. Each head on its own: slot j of two heads holds different tokens. At
    equal scores, never rank an older token above a newer one (equal ranks, or the newer
    first, are fine). The rules the checker applies: exercises/README.md, "Assignment 4b, rules".

    Hints: torch.where(mask, float("inf"), scores). Old tokens have had more queries to collect
    attention from than new ones: try dividing by their age (seen - pos) and compare with
    eval_kv.py. kv.evict.h2o_priority is the project's version.
    """
    raise NotImplementedError("assignment 4 (KV eviction): implement priority in exercises/kv_evict.py")
