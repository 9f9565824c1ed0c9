"""
KVOptions: every kv_* option of sample.py, eval_kv.py and bench.py in one object, which
checks them and builds the caches of a model. The one route from a script's globals to a cache:

    from kv.policy import KVOptions
    kv = KVOptions.from_settings(globals())           # the script's kv_* globals
    caches = kv.make_caches(model, batch_size=1, capacity=T)
    logits, caches = model(idx, caches)

The fields, with their defaults, are the scripts' settings (same names, units and defaults
everywhere); the comment beside each is its --help line.
"""

from dataclasses import asdict, dataclass, fields, replace

import torch

from attention import PLAIN_SOFTMAX
from kv.cache import KVCache, TrimCache
from kv.evict import EvictKVCache, check_rule, reads_scores, resolve_evict
from kv.quant import CHANNEL_KEYS, GROUPED, make_formats, resolve_quant
from kv.quant_cache import QuantKVCache
from kv.static import Clock, StaticKVCache, StaticQuantCache
from plugins import call_error, import_function
from utils import UserError


@dataclass(frozen=True)
class KVOptions:
    kv_window: int = -1  # a query sees the newest kv_window tokens, itself included (0 = all; -1: sample.py the checkpoint's xl_mem if it has one, else all; eval_kv.py the reference's bound; bench.py 256)
    kv_sink: int = 0  # the first kv_sink tokens of the text stay too: on top of kv_window, inside kv_budget
    kv_trim: str = ""  # "package.module:function" (or "path/to/file.py:function") choosing the tokens kv_window keeps, instead of the ring buffer (exercise 1)
    kv_quant: str = "none"  # storage of K/V: none, int8, fp8_e4m3, fp8_e5m2, int4, int2, or package.module:function
    kv_quant_group: int = 32  # int4/int2: values per group sharing one scale and zero point
    kv_quant_keys: str = "channel"  # int4/int2 keys grouped per 'channel' over kv_quant_group tokens (KIVI), or per 'token' like values (eviction always uses 'token')
    kv_quant_residual: int = 32  # newest tokens kept in full precision by a quantized cache (the current one included)
    kv_evict: str = "none"  # none, window (recency), h2o (attention score), or package.module:function
    kv_budget: int = 0  # with kv_evict: tokens held per layer and KV head, kv_sink and the current token included
    kv_recent: int = 0  # with a kv_evict rule by score (h2o, your own): newest tokens always kept (the current one included)
    # (a new option is a field here: it reaches every script's settings and --help at once; its
    # branch in _cache goes before the plain KVCache's; add it to BUILT_IN only once describe(),
    # compressed, kv.static.static_reason and the checks know it)

    @classmethod
    def from_settings(cls, settings):
        """The options from a dict holding (at least) every field, e.g. a script's globals()."""
        return cls(**{f.name: settings[f.name] for f in fields(cls)})

    def settings(self):
        return asdict(self)

    def others(self):
        """[(name, value)] of the options set away from their default that are not BUILT_IN:
        a new option, which describe() then names as it is and the compiled step leaves eager."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)
                if f.name not in BUILT_IN and getattr(self, f.name) != f.default]

    def for_checkpoint(self, config, say=print, no_cache=False):
        """kv_window=-1 resolved for a checkpoint's saved config: a model trained with XL
        memory saw at most xl_mem tokens of history, others had no bound. no_cache: the model
        has linear attention in every layer (GPTConfig.no_kv_cache): no cache to bound."""
        if self.kv_window != -1:
            return self
        if no_cache:
            return replace(self, kv_window=0)
        xl = saved_tokens(config, "xl_mem", "give --kv_window=N (0: no bound) to sample it anyway")
        if xl:
            say(f"kv_window={xl}: the xl_mem this model was trained with (--kv_window=0 for no bound)")
        return replace(self, kv_window=xl)

    def check(self):
        """Raise one UserError for any option or combination that makes no sense."""
        resolve_quant(self.kv_quant)
        check_rule(self.kv_evict)  # (a user's rule: called once on a small input)
        if self.kv_trim:
            import_function(self.kv_trim, "kv_trim")  # a missing module or function: said before any work
        for name, low in (("kv_window", -1), ("kv_sink", 0), ("kv_quant_group", 1), ("kv_quant_residual", 0),
                          ("kv_budget", 0), ("kv_recent", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.kv_quant_keys not in ("channel", "token"):
            raise UserError(f"kv_quant_keys must be 'channel' or 'token', got {self.kv_quant_keys!r}")
        if self.kv_trim and (self.kv_quant != "none" or self.kv_evict != "none"):
            raise UserError("--kv_trim replaces the cache; it does not combine with --kv_quant or --kv_evict")
        residual, group = (self.kv_quant_residual, self.key_group()) if self.kv_quant != "none" else (0, 0)
        # a residual that fills the window leaves nothing to quantize: the row would say int4
        # and hold full precision
        if group and 0 < self.kv_window < residual + group:
            what = f"a key group of kv_quant_group={group} tokens" if group > 1 else "the token that leaves it"
            ways = [f"lower kv_quant_residual to at most {self.kv_window - group}"] if self.kv_window >= group else []
            if group > 1:
                ways += [f"use a kv_quant_group of at most {self.kv_window - residual}"] * (self.kv_window > residual)
                ways += ["use --kv_quant_keys=token (keys grouped per token, as values)"
                         + (f" with kv_quant_residual at most {self.kv_window - 1}" if residual >= self.kv_window else "")]
            raise UserError(f"kv_quant_residual={residual} plus {what} does not fit in kv_window="
                            f"{self.kv_window}: nothing would be quantized; " + ", or ".join(ways + ["raise kv_window"]))
        if self.kv_sink and self.kv_window == 0 and self.kv_evict == "none":
            raise UserError(f"kv_sink={self.kv_sink} keeps the first tokens when a bounded cache drops older "
                            "ones, but nothing is dropped here: add --kv_window=N (or --kv_evict), or drop --kv_sink")
        if self.kv_evict == "none":
            if self.kv_budget or self.kv_recent:
                raise UserError("kv_budget and kv_recent apply to eviction: add --kv_evict=h2o or --kv_evict=window")
            return self
        if self.kv_evict == "window" and self.kv_recent:
            raise UserError("kv_recent applies to --kv_evict=h2o (or your rule); kv_evict=window keeps the newest "
                            "kv_budget tokens anyway: drop --kv_recent")
        if self.kv_budget < 1:
            raise UserError(f"kv_evict={self.kv_evict} needs a budget: --kv_budget=N tokens kept per layer")
        if self.kv_budget < self.kv_sink + max(self.kv_recent, 1):
            raise UserError(f"kv_budget={self.kv_budget} is smaller than kv_sink + kv_recent = "
                            f"{self.kv_sink + max(self.kv_recent, 1)}, the tokens eviction always keeps "
                            "(kv_recent counts the current token, so at least 1); raise kv_budget or lower them")
        if residual and self.kv_budget < self.kv_sink + residual + 1:
            raise UserError(f"kv_budget={self.kv_budget} cannot hold kv_sink={self.kv_sink} plus the "
                            f"kv_quant_residual={residual} full-precision tokens and the one leaving them at "
                            f"each step ({self.kv_sink + residual + 1} in all); raise kv_budget or lower "
                            "kv_quant_residual")
        return self

    def check_unused(self):
        """One UserError for a quantization setting that the chosen kv_quant ignores (the
        defaults aside), so that no row is labelled with a setting that did nothing."""
        default = {f.name: f.default for f in fields(self)}
        # (a plug-in quantizer gets whole rows: no group, no keys' way)
        where = {"kv_quant_group": GROUPED, "kv_quant_keys": CHANNEL_KEYS}
        unused = [n for n, kinds in where.items() if self.kv_quant not in kinds and getattr(self, n) != default[n]]
        if self.kv_quant == "none" and self.kv_quant_residual != default["kv_quant_residual"]:
            unused.append("kv_quant_residual")
        if unused:
            one = len(unused) == 1
            kinds = dict.fromkeys(f for n in unused if n in where for f in where[n])
            raise UserError(f"--{' and --'.join(unused)} " + ("applies" if one else "apply") + " to "
                            + (" and ".join(kinds) if self.kv_quant != "none" else "a quantized cache")
                            + f", not to kv_quant={self.kv_quant}: drop " + ("it" if one else "them")
                            + " or choose another --kv_quant")
        return self

    def ranks_by_score(self):
        """Does the eviction rank keys by the softmax attention they receive (h2o, a plug-in
        rule not marked needs_scores = False)? Such a cache attends itself, written out
        (kv.evict.EvictKVCache.attend)."""
        return self.kv_evict != "none" and reads_scores(resolve_evict(self.kv_evict))

    def check_model(self, config):
        """One UserError when a model (GPTConfig) has no KV cache for these options to act on
        (linear attention in every layer keeps a fixed-size state instead), or when an eviction
        that ranks by softmax scores would replace an attention kind that is not softmax."""
        if config.no_kv_cache:
            default = {f.name: f.default for f in fields(self)}
            used = [n for n in ("kv_window", "kv_sink", "kv_trim", "kv_quant", "kv_evict") if getattr(self, n) != default[n]]
            if used and not (used == ["kv_window"] and self.kv_window == 0):
                raise UserError(f"every layer of this model is linear attention, which keeps a fixed-size state, not "
                                f"a KV cache: --{', --'.join(used)} would change nothing; drop "
                                + ("it" if len(used) == 1 else "them"))
        other = sorted(config.cached_kinds() - set(PLAIN_SOFTMAX))  # (a hybrid's linear layers hold no keys)
        if self.ranks_by_score() and other:
            raise UserError(f"--kv_evict={self.kv_evict} ranks keys by the softmax attention they receive, and "
                            f"computes it itself: this model's attention={other[0]} would be replaced by "
                            f"softmax; use --kv_evict=window, or a model with {' or '.join(PLAIN_SOFTMAX)} attention"
                            + ("; a rule that ranks by position alone says so: function.needs_scores = False "
                               "(kv/evict.py)" if ":" in self.kv_evict else ""))
        return self

    def check_trim(self, config):
        """One UserError when kv_trim has nothing to trim: no kv_window bound (after
        for_checkpoint) and no local layer in the model (GPTConfig)."""
        if self.kv_trim and not self.kv_window and not any(config.is_local(i) for i in range(config.n_layer)):
            raise UserError(f"--kv_trim={self.kv_trim} chooses what a bounded cache keeps, and this one has no bound "
                            "(kv_window=0): add --kv_window=N (e.g. --kv_window=64), or it is never called")
        if self.kv_trim:  # tried once as the first token past the bound will call it: a stub, a wrong
            # signature or a result that breaks the contract is said before any text. Other errors
            # are left to the run, which meets them with the plug-in's own lines if they are real
            window = self.kv_window if self.kv_window > 0 else config.window
            trial = TrimCache(1, config.kv_heads, config.head_dim, window=window, sink=self.kv_sink,
                              trim_fn=import_function(self.kv_trim, "kv_trim"), trim_name=self.kv_trim)
            S, g = window + self.kv_sink + 1, torch.Generator().manual_seed(0)  # (not the run's random state)
            k, v = (torch.randn(1, config.kv_heads, S, config.head_dim, generator=g) for _ in range(2))
            try:
                trial._trim(k, v, torch.arange(S))
            except Exception as e:
                if isinstance(e, (UserError, NotImplementedError)) or call_error(e) is not None:
                    raise
        return self

    def key_group(self):
        """Tokens a quantized cache waits for before it can quantize keys: kv_quant_group for
        int4/int2 keys grouped per channel (no eviction), else 1."""
        per_channel = self.kv_quant in CHANNEL_KEYS and self.channel_keys
        return self.kv_quant_group if per_channel else 1

    def local_residual(self, config):
        """(residual, note): the kv_quant_residual the local layers of a model (GPTConfig
        `config`, window config.window) can hold and still quantize, and a line saying so when
        that is less than asked (note None otherwise)."""
        r, w, g = self.kv_quant_residual, config.window, self.key_group()
        local = any(config.is_local(i) for i in range(config.n_layer))
        bound = 0 < self.kv_window < w  # a tighter kv_window binds instead (and check() vetted it)
        if self.kv_quant == "none" or not local or bound or r + g <= w:
            return r, None
        fit = max(w - g, 0)
        note = (f"note: the model's local layers (window {w}) keep kv_quant_residual={fit}, not {r}, "
                "so that something is quantized")
        if g > w:
            note = (f"note: a key group of kv_quant_group={g} tokens does not fit in the model's local "
                    f"window {w}: its local layers quantize nothing; lower kv_quant_group")
        return fit, note

    def local_note(self, config, inherited=0):
        """A line when a setting the user gave cannot act (None otherwise): where every softmax
        layer of a model (GPTConfig) is local, a bound, sinks or budget past the window
        config.window (a local layer holds at most its window, and sinks only where a tighter
        kv_window or a budget binds inside it: make_caches); on any model, an eviction budget
        at least what kv_window and kv_sink keep. inherited: the window kv_window=-1 stands for
        (eval_kv: the reference's)."""
        note = self._local_note(config)
        window = inherited if self.kv_window == -1 else self.kv_window
        held = window + self.kv_sink
        if note is None and self.kv_evict != "none" and window > 0 and self.kv_budget >= held:
            bound = (f"kv_window={window}" if self.kv_window != -1 else f"the reference's window of {window}") \
                + (f" and kv_sink={self.kv_sink}" if self.kv_sink else "")
            verb = "keep" if self.kv_sink else "keeps"
            note = f"note: {bound} {verb} at most {held} tokens, so kv_budget={self.kv_budget} changes nothing"
        return note

    def context_note(self, config, saved, length=0):
        """A line when the cache lets a global softmax layer of a model (GPTConfig) read further
        back than it read in training: its block, plus any XL memory before it, as its saved
        training settings (a checkpoint's config) say (None otherwise, or if they do not). Too
        long a kv_window, none at all, eviction without one (a rule by score keeps tokens at any
        distance) and sinks all do. length: the most tokens a query of the run sees, which an
        unbounded cache (kv_window=0) all keeps."""
        trained = saved_tokens(saved, "xl_mem") + saved_tokens(saved, "block_size")
        glob = [i for i in range(config.n_layer) if not config.keeps_state(i) and not config.is_local(i)]
        if not glob or trained <= 0:
            return None
        local = any(config.is_local(i) for i in range(config.n_layer))
        layers = "its global layers" if local else "its softmax layers" if len(glob) < config.n_layer else "its layers"
        if self.kv_window == 0 and self.kv_evict == "none" and length > trained:
            return (f"note: no kv_window, and {length:,} tokens: past the {trained} tokens of history this model was "
                    f"trained with, {layers} read distances they never saw (--kv_window={trained} stays "
                    "within)")
        if trained < self.kv_window:
            return (f"note: kv_window={self.kv_window} is longer than the {trained} tokens of history this model was "
                    f"trained with: past them {layers} read distances they never saw (kv_window={trained} "
                    "stays within)")
        if length <= trained:
            return None
        # eviction without a window: a rule by score may keep a token at any distance; recency, its budget
        reach = (self.kv_budget - self.kv_sink if self.kv_evict == "window" else length) if self.kv_window == 0 else 0
        if self.kv_evict != "none" and reach > trained:
            return (f"note: no kv_window: kv_evict={self.kv_evict} can keep tokens further back than the {trained} "
                    f"tokens of history this model was trained with, at distances {layers} never saw (add "
                    f"--kv_window={trained} to stay within)")
        if self.kv_sink:
            return (f"note: past the {trained} tokens of history this model was trained with, the "
                    f"kv_sink={self.kv_sink} first tokens sit at distances {layers} never saw (the rest of the cache "
                    "stays within)")
        return None

    def unquantized_note(self, config, cached):
        """A line when a quantized cache (no eviction) of a model whose every cache is a global
        layer's (GPTConfig) holds no more than cached tokens, fewer than it keeps in full precision:
        the residual and a key group waiting to fill. It then holds as many bits as the plain
        cache. (A local layer keeps its window, with a residual of its own: not said there.)"""
        tokens = min(cached, self.kv_window + self.kv_sink) if self.kv_window > 0 else cached
        group = self.key_group()
        waits = self.kv_quant_residual + group - 1  # tokens a quantized cache holds back at most
        plain = not config.no_kv_cache and not any(config.is_local(i) for i in range(config.n_layer))
        if self.kv_quant == "none" or self.kv_evict != "none" or not plain or tokens > waits:
            return None
        keys = f", and keys waiting for a group of {group}" if group > 1 else ""
        return (f"note: a cache of {tokens} tokens is no longer than what --kv_quant={self.kv_quant} keeps in full "
                f"precision (the newest kv_quant_residual={self.kv_quant_residual}{keys}), so it saves nothing "
                "here; --kv_quant_residual=0" + (" --kv_quant_keys=token" if group > 1 else "") + " quantizes every "
                "token")

    def _local_note(self, config):
        w = config.window
        softmax = [i for i in range(config.n_layer) if not config.keeps_state(i)]
        if not softmax or not all(config.is_local(i) for i in softmax):
            return None
        evicts = self.kv_evict != "none"
        idle = [f"kv_window={self.kv_window}"] if self.kv_window >= w else []
        idle += [f"kv_budget={self.kv_budget}"] if evicts and self.kv_budget >= w else []
        binds = 0 < self.kv_window < w or (evicts and self.kv_budget < w)  # sinks in sight (make_caches)
        idle += [f"kv_sink={self.kv_sink}"] if self.kv_sink and not binds else []
        if idle:
            return (f"note: every layer of this model attends at most {w} tokens back (--window={w}), so "
                    f"{', '.join(idle)} changes nothing")
        return None

    @property
    def channel_keys(self):
        """int4/int2 keys per channel (KIVI): without eviction, unless kv_quant_keys='token'."""
        return self.kv_evict == "none" and self.kv_quant_keys == "channel"

    @property
    def compressed(self):
        return self.kv_quant != "none" or self.kv_evict != "none" or bool(self.others())

    def describe(self):
        """A short name for the cache setting, e.g. 'int4/g32/r32 + h2o 512 (recent 256, sink 4)'."""
        parts = []
        if self.kv_quant != "none":
            token_keys = self.kv_quant in CHANNEL_KEYS and not self.channel_keys  # (with eviction always: said)
            parts.append(self.kv_quant + (f"/g{self.kv_quant_group}" if self.kv_quant in GROUPED else "")
                         + f"/r{self.kv_quant_residual}" + ("/token-keys" if token_keys else ""))
        if self.kv_evict != "none":
            extra = [f"recent {self.kv_recent}"] if self.kv_evict != "window" and self.kv_recent else []
            extra += [f"sink {self.kv_sink}"] if self.kv_sink else []
            name = "evict-window" if self.kv_evict == "window" else self.kv_evict  # not the history bound's "window"
            parts.append(f"{name} {self.kv_budget}" + (f" ({', '.join(extra)})" if extra else ""))
        parts += [f"{name}={value}" for name, value in self.others()]
        return " + ".join(parts) or "none"

    def make_caches(self, model, batch_size, capacity=256, dtype=None, static=False):
        """One cache per layer, the same object for the layers of a kv_share group. A local
        layer never holds more than its window; a linear layer holds its fixed-size state.
        dtype: of the cached K/V; default the dtype they come in (autocast's, or the model's).
        static: their static-shape twins on one Clock, for the compiled decode step (kv/static.py;
        only where kv.static.static_reason(self, model.config, device) is None)."""
        c = model.config
        p = next(model.parameters())
        dtype = dtype or cache_dtype(p)
        clock = Clock(p.device) if static else None
        caches = []
        for i in range(c.n_layer):
            if i % c.kv_share:
                caches.append(caches[-1])
            elif c.keeps_state(i):  # linear attention's sums (its layer class makes it)
                caches.append(model.transformer.h[i].attn.make_state(c, batch_size, p.dtype, p.device))
            else:
                window, sink, residual = max(self.kv_window, 0), self.kv_sink, self.kv_quant_residual
                if c.is_local(i) and (window == 0 or window >= c.window):
                    # its own window bounds it; sinks only where a budget binds inside it (as
                    # a tighter kv_window's sinks do), never behind it
                    binds = self.kv_evict != "none" and self.kv_budget < c.window
                    window, sink = c.window, (sink if binds else 0)
                    residual = self.local_residual(c)[0]  # (eval_kv prints its note)
                caches.append(self._cache(batch_size, c.kv_heads, c.head_dim, window, sink, capacity, dtype,
                                          p.device, residual, clock))
        return caches

    def _cache(self, batch_size, n_kv_head, head_dim, window, sink, capacity, dtype, device, residual, clock=None):
        kw = dict(batch_size=batch_size, n_kv_head=n_kv_head, head_dim=head_dim, window=window, sink=sink,
                  dtype=dtype, device=device)
        if clock is not None:  # the static twins (kv/static.py)
            if self.kv_quant == "none":
                return StaticKVCache(clock, capacity=capacity, **kw)
            fmts = make_formats(self.kv_quant, self.kv_quant_group, head_dim, channel_keys=self.channel_keys)
            return StaticQuantCache(clock, *fmts, residual=residual, capacity=capacity, **kw)
        if self.kv_trim:
            return TrimCache(trim_fn=import_function(self.kv_trim, "kv_trim"), trim_name=self.kv_trim, **kw)
        if not self.compressed:
            return KVCache(capacity=capacity, **kw)
        fmts = (None, None)
        if self.kv_quant != "none":
            fmts = make_formats(self.kv_quant, self.kv_quant_group, head_dim, channel_keys=self.channel_keys)
        if self.kv_evict == "none":
            return QuantKVCache(*fmts, residual=residual, **kw)
        policy = resolve_evict(self.kv_evict) or self.kv_evict  # h2o and a user's rule are functions
        return EvictKVCache(policy, self.kv_budget, keep_recent=self.kv_recent, keep_sink=self.kv_sink,
                            key_fmt=fmts[0], val_fmt=fmts[1], residual=residual, **kw)


BUILT_IN = ("kv_window", "kv_sink", "kv_trim", "kv_quant", "kv_quant_group", "kv_quant_keys", "kv_quant_residual",
            "kv_evict", "kv_budget", "kv_recent")  # the options every part of kv/ knows


def saved_tokens(config, key, advice="use another checkpoint, or train it again"):
    """A checkpoint's saved config[key] (xl_mem, block_size) as a number of tokens, 0 where it
    is not recorded; one UserError for a value no training run writes (a hand-edited file)."""
    n = config.get(key, 0) or 0
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise UserError(f"the checkpoint's config says {key}={n!r}, which no training run writes: {advice}")
    return n


def cache_dtype(param):
    """Caches hold K/V in the dtype they arrive in: autocast's when it is on, else the model's."""
    if torch.is_autocast_enabled(param.device.type):
        return torch.get_autocast_dtype(param.device.type)
    return param.dtype


def unique(caches):
    """Each cache once (the layers of a kv_share group share one)."""
    return list({id(c): c for c in caches}.values())


def held_bits(caches):
    """Bits held by all caches, and the most tokens any one KV cache holds (per sequence; 0
    when every layer keeps a fixed-size state)."""
    u = unique(caches)
    return sum(c.size_bits() for c in u), max((c.tokens() for c in u if c.holds_tokens), default=0)


def state_bits(caches):
    """Bits held by the layers that keep a fixed-size state (linear attention), whatever the
    text's length: a part of held_bits that no cached token accounts for."""
    return sum(c.size_bits() for c in unique(caches) if not c.holds_tokens)
