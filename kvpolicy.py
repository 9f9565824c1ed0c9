"""
One place that turns the kv_* options of sample.py and eval_kv.py into caches.

    from kvpolicy import make_cache_factory
    make_cache = make_cache_factory(kv_quant="int4", kv_evict="h2o", kv_budget=512, kv_recent=256, kv_sink=4)
    states = model.new_states(batch_size, make_cache=make_cache)   # None: the plain cache

Options (the same names as the scripts' globals):
  kv_quant           "none" | "int8" | "fp8_e4m3" | "fp8_e5m2" | "int4" | "int2" | "package.module:function"
  kv_quant_group     values per int4/int2 group (keys: tokens per channel group; values: channels)
  kv_quant_residual  newest tokens kept in full precision
  kv_evict           "none" | "window" (StreamingLLM) | "h2o" (Heavy-Hitter Oracle) | "package.module:function"
  kv_budget          tokens kept per layer and KV head between steps (with kv_evict)
  kv_recent          newest tokens h2o always keeps
  kv_sink            first tokens eviction always keeps
See kvquant.py and kvevict.py for what each does and how they compose.
"""

from kvevict import POLICIES, EvictKVCache, resolve_evict
from kvquant import FORMATS, QuantKVCache, make_formats, resolve_quant
from utils import UserError


def check_options(kv_quant="none", kv_quant_group=32, kv_quant_residual=32, kv_evict="none",
                  kv_budget=0, kv_recent=0, kv_sink=0):
    """Raise one UserError for any option or combination that makes no sense."""
    resolve_quant(kv_quant)
    resolve_evict(kv_evict)
    for name, value, low in (("kv_quant_group", kv_quant_group, 1), ("kv_quant_residual", kv_quant_residual, 0),
                             ("kv_budget", kv_budget, 0), ("kv_recent", kv_recent, 0), ("kv_sink", kv_sink, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    if kv_evict == "none":
        if kv_budget or kv_recent:
            raise UserError("kv_budget and kv_recent apply to eviction: add --kv_evict=h2o or --kv_evict=window")
        return
    if kv_budget < 1:
        raise UserError(f"kv_evict={kv_evict} needs a budget: --kv_budget=N tokens kept per layer")
    if kv_budget < kv_sink + kv_recent:
        raise UserError(f"kv_budget={kv_budget} is smaller than kv_sink + kv_recent = {kv_sink + kv_recent}, "
                        "the tokens eviction always keeps; raise kv_budget or lower them")
    residual = kv_quant_residual if kv_quant != "none" else 0
    if kv_budget < kv_sink + max(kv_recent, residual):
        raise UserError(f"kv_budget={kv_budget} cannot hold kv_sink={kv_sink} plus the "
                        f"kv_quant_residual={residual} full-precision tokens eviction keeps; "
                        "raise kv_budget or lower kv_quant_residual")


def make_cache_factory(kv_quant="none", kv_quant_group=32, kv_quant_residual=32, kv_evict="none",
                       kv_budget=0, kv_recent=0, kv_sink=0):
    """Validate the options and return make_cache(layer_idx, batch_size, n_kv_head, head_dim,
    recent, sink, capacity, dtype, device) for GPT.new_states(make_cache=...), or None when
    nothing is compressed (the plain kvcache.KVCache). Errors that depend on the model (a
    group that does not divide the head dimension) come from the first make_cache call."""
    check_options(kv_quant, kv_quant_group, kv_quant_residual, kv_evict, kv_budget, kv_recent, kv_sink)
    if kv_quant == "none" and kv_evict == "none":
        return None

    def make_cache(layer_idx, batch_size, n_kv_head, head_dim, recent=0, sink=0, capacity=256,
                   dtype=None, device="cpu"):
        kw = dict(batch_size=batch_size, n_kv_head=n_kv_head, head_dim=head_dim, recent=recent,
                  sink=sink, device=device)
        if dtype is not None:
            kw["dtype"] = dtype
        fmts = (None, None)
        if kv_quant != "none":
            fmts = make_formats(kv_quant, kv_quant_group, head_dim, channel_keys=kv_evict == "none")
        if kv_evict == "none":
            return QuantKVCache(*fmts, residual=kv_quant_residual, **kw)
        policy = resolve_evict(kv_evict) or kv_evict  # h2o and a user's rule are functions
        return EvictKVCache(policy, kv_budget, keep_recent=kv_recent, keep_sink=kv_sink,
                            key_fmt=fmts[0], val_fmt=fmts[1], residual=kv_quant_residual, **kw)

    make_cache.describe = describe(kv_quant, kv_quant_group, kv_quant_residual, kv_evict,
                                   kv_budget, kv_recent, kv_sink)
    return make_cache


def describe(kv_quant="none", kv_quant_group=32, kv_quant_residual=32, kv_evict="none",
             kv_budget=0, kv_recent=0, kv_sink=0):
    """A short name for a setting, e.g. 'int4/g32/r32 + h2o 512 (recent 256, sink 4)'."""
    parts = []
    if kv_quant != "none":
        grouped = kv_quant in ("int4", "int2")
        parts.append(kv_quant + (f"/g{kv_quant_group}" if grouped else "") + f"/r{kv_quant_residual}")
    if kv_evict != "none":
        extra = [f"recent {kv_recent}"] if kv_evict != "window" and kv_recent else []
        extra += [f"sink {kv_sink}"] if kv_sink else []
        parts.append(f"{kv_evict} {kv_budget}" + (f" ({', '.join(extra)})" if extra else ""))
    return " + ".join(parts) or "none"


__all__ = ["FORMATS", "POLICIES", "check_options", "describe", "make_cache_factory"]
