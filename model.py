"""
A byte-level GPT with RoPE and pluggable attention, in one file read leaves-first:
config, attention layer, MLP, Block, GPT. The attention kinds are in attention.py, the KV
caches in kv/, generation in generate.py.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128))
    logits, _ = model(idx)                  # idx (B, T) bytes: training, no cache kept
    caches = KVOptions().make_caches(model, batch_size=B)     # from kv.policy
    logits, caches = model(idx, caches)     # the caches remember the text
    logits, caches = model(more, caches)    # and the next call continues it

Importing this module has no side effects.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from rotary_embedding_torch import RotaryEmbedding

from attention import resolve_attention
from attention_linear import LinearAttention
from kv.cache import attention_mask
from rope import apply_rope, rope_table
from utils import UserError


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True          # bias in Linears and LayerNorms
    dropout: float = 0.0
    vocab_size: int = 256      # raw bytes, always
    attention: str = "softmax"  # "softmax" | "naive" | "linear" | "package.module:function"
    n_kv_head: int = 0         # key/value heads; 0 = n_head (MHA), 1 = MQA
    window: int = 0            # local attention span of non-global layers; 0 = off
    global_layers: str = ""    # comma-separated layer indices that attend to everything
    kv_share: int = 1          # consecutive layers per group sharing one K/V
    rope: bool = True          # rotary position embedding on q and k
    linear_layers: str = ""    # with attention="linear": which layers are linear ("" = all)
    linear_norm: str = "layernorm"  # linear attention output: "layernorm" | "denominator" | "none"

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def layer_set(self, name):
        text = str(getattr(self, name)).strip()
        return {int(s) for s in text.split(",") if s.strip()} if text else set()

    def is_local(self, i):
        return self.window > 0 and i not in self.layer_set("global_layers")

    def is_linear(self, i):
        if self.attention != "linear":
            return False
        chosen = self.layer_set("linear_layers")
        return not chosen or i in chosen

    def kind(self, i):
        """The attention kind of layer i (hybrids: linear layers beside softmax ones)."""
        if self.attention == "linear":
            return "linear" if self.is_linear(i) else "softmax"
        return self.attention

    def keeps_state(self, i):
        """Does layer i keep a fixed-size state of its own instead of a KV cache? (Its layer
        class in ATTENTION_LAYERS has a make_state, as linear attention's has.)"""
        return hasattr(ATTENTION_LAYERS.get(self.kind(i)), "make_state")

    def cached_kinds(self):
        """The attention kinds of the layers that keep a KV cache (all but linear layers)."""
        return {self.kind(i) for i in range(self.n_layer) if not self.keeps_state(i)}

    @property
    def no_kv_cache(self):
        """A state in every layer (linear attention): fixed-size, no KV cache to bound or shrink."""
        return all(self.keeps_state(i) for i in range(self.n_layer))


MODEL_ARG_KEYS = tuple(f.name for f in fields(GPTConfig) if f.name != "vocab_size")
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "bias")  # fixed by a checkpoint's weights


def check_config(c):
    """Raise UserError for any combination the model cannot build."""
    if min(c.n_layer, c.n_head, c.n_embd) < 1:
        raise UserError(f"n_layer, n_head and n_embd must be positive (got {c.n_layer}, {c.n_head}, {c.n_embd})")
    if c.n_embd % c.n_head:
        fits = [d for d in range(1, c.n_embd + 1) if c.n_embd % d == 0 and not (c.rope and c.n_embd // d % 2)]
        near = sorted(sorted(fits, key=lambda d: abs(d - c.n_head))[:2])  # (none: n_embd odd, with RoPE)
        heads = f"--n_head={' or '.join(map(str, near))}, or " if near else ""
        raise UserError(f"n_embd={c.n_embd} is not a multiple of n_head={c.n_head}: choose {heads}an "
                        f"{'even ' if c.rope else ''}n_embd that n_head divides")
    if c.rope and c.head_dim % 2:
        raise UserError(f"RoPE needs an even head dimension, n_embd/n_head = {c.head_dim}; change n_head or set --rope=False")
    if c.n_kv_head < 0:
        raise UserError(f"n_kv_head must be >= 0 (0 = n_head, 1 = MQA), got {c.n_kv_head}")
    if c.n_head % c.kv_heads:
        fits = [d for d in range(1, c.n_head + 1) if c.n_head % d == 0]
        raise UserError(f"n_head={c.n_head} must be a multiple of n_kv_head={c.n_kv_head}: choose --n_kv_head="
                        f"{', '.join(map(str, fits[:-1])) + ' or ' if fits[:-1] else ''}{fits[-1]} (1 = MQA; 0, the "
                        "default, = n_head)")
    if not 0.0 <= c.dropout <= 1.0:  # (a nan too)
        raise UserError(f"dropout must be between 0 and 1, got {c.dropout}")
    if c.window < 0:
        raise UserError(f"window must be >= 0 (0 = off), got {c.window}")
    if not 1 <= c.kv_share <= c.n_layer:
        raise UserError(f"kv_share must be between 1 (off) and n_layer={c.n_layer} (one K/V for every layer), "
                        f"got {c.kv_share}")
    for name in ("global_layers", "linear_layers"):
        try:
            layers = c.layer_set(name)
        except ValueError:
            raise UserError(f"{name} must be comma-separated layer indices like '0,5', got {getattr(c, name)!r}") from None
        bad = sorted(i for i in layers if not 0 <= i < c.n_layer)
        if bad:
            raise UserError(f"{name}={getattr(c, name)!r}: layer index {bad[0]} out of range 0..{c.n_layer - 1}")
    if c.linear_layers and c.attention != "linear":
        raise UserError("linear_layers needs --attention=linear (the other layers then use softmax)")
    if c.linear_norm not in ("layernorm", "denominator", "none"):
        raise UserError(f"unknown linear_norm {c.linear_norm!r}: choose layernorm, denominator or none")
    resolve_attention(c.attention, layer_kinds=ATTENTION_LAYERS)  # (an unknown name: the kinds to choose from)
    for g in range(0, c.n_layer, c.kv_share):
        group = range(g, min(g + c.kv_share, c.n_layer))
        if len({(c.is_local(i), c.kind(i)) for i in group}) > 1:
            raise UserError(f"kv_share={c.kv_share}: layers {group.start}..{group.stop - 1} mix local/global "
                            "or attention kinds; align global_layers/linear_layers with the groups")
        if c.keeps_state(g) and c.kv_share > 1:
            raise UserError("kv_share applies to softmax K/V caches, not to linear attention layers")


# -----------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Attention over a KV cache with the kind's function (attention.py: softmax, naive or a
    plug-in) doing the attending. The first layer of a kv_share group projects K/V and owns the
    cache; the other layers of the group project only q and reuse that K/V."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        owns_kv = layer_idx % config.kv_share == 0
        kv_dim = 2 * self.n_kv_head * self.head_dim if owns_kv else 0
        # c_attn stacks q (n_head heads), then k and v (n_kv_head heads each)
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + kv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # every layer keeps the frequencies, as the tutorial's checkpoints do; only h[0]'s are read
        self.rotary_emb = RotaryEmbedding(dim=self.head_dim)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.window = config.window if config.is_local(layer_idx) else 0
        kind = config.kind(layer_idx)  # (a layer class built on this one starts from softmax's function)
        self.attend = resolve_attention("softmax" if kind in ATTENTION_LAYERS else kind)

    def forward(self, x, pos, rot, cache=None, shared=None):
        """x (B, T, C) at text positions pos (T,), rot their RoPE table (or None); cache: this
        layer's cache or None (training); shared: the (k, v, mask) of the group's first layer.
        Returns y and (k, v, mask) for the other layers of the group."""
        B, T, C = x.size()
        n_rot = self.n_head if shared is not None else self.n_head + self.n_kv_head  # heads RoPE turns: q and k
        qkv = self.c_attn(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh + 2 nkv, T, hs); (B, nh, T, hs) if shared
        qk = qkv[:, :n_rot] if rot is None else apply_rope(qkv[:, :n_rot], rot)  # q and k, each at its position
        q = qk[:, :self.n_head]
        if shared is not None:
            k, v, mask = shared
        elif cache is not None:
            k, v, mask = cache.update(qk[:, self.n_head:], qkv[:, n_rot:])  # (B, nkv, S, hs) to attend over
        else:  # training: the text of this call is all there is
            k, v, mask = qk[:, self.n_head:], qkv[:, n_rot:], attention_mask(pos, pos, self.window)
        p = self.dropout if self.training else 0.0
        y = self.attend(q, k, v, mask, p) if cache is None else cache.attend(self.attend, q, k, v, mask, p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y)), (k, v, mask)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


# attention kinds that need a layer class of their own; the others are functions in attention.py
ATTENTION_LAYERS = {"linear": LinearAttention}


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = ATTENTION_LAYERS.get(config.kind(layer_idx), CausalSelfAttention)(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, pos, rot, cache=None, shared=None):
        y, kv = self.attn(self.ln_1(x), pos, rot, cache, shared)
        x = x + y
        x = x + self.mlp(self.ln_2(x))
        return x, kv



def loss_fn(logits, targets):
    """Mean next-byte cross entropy in nats; targets of -1 are ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._rope_cache = None  # (key, table): see _rope
        self.transformer.wte.weight = self.lm_head.weight  # tied
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, idx, caches=None):
        """idx (B, T) bytes -> logits (B, T, 256), and the caches given (one per layer, from
        kv.policy.KVOptions.make_caches or kv.xl.make_xl_memory), now holding this text too.
        caches=None (training) keeps nothing: the call sees only its own T bytes."""
        if torch.is_tensor(caches):  # nanoGPT's model(x, targets)
            raise TypeError("GPT.forward(idx, caches) takes a list of caches, not targets: "
                            "logits, _ = model(x); loss = model.loss(logits, targets)")
        T = idx.size(1)
        start = min(c.seen for c in caches) if caches is not None else 0  # XL: right after the memory
        pos = torch.arange(start, start + T, device=idx.device)
        rot = self._rope(start, T) if self.config.rope else None
        return self._blocks(idx, pos, rot, caches), caches

    def step(self, idx, pos, rot_table, caches):
        """The decode step with its position as a tensor: idx (B, 1) at position pos (1,), the
        static caches of kv/static.py (which read the same position from their Clock), rot_table
        the RoPE table of every position the step may reach (or None). No Python number in here
        changes from one token to the next, so a compiled step is traced once. -> (B, 1, V)"""
        rot = rot_table.index_select(0, pos) if rot_table is not None else None  # (1, hs/2, 2)
        return self._blocks(idx, pos, rot, caches)

    def _blocks(self, idx, pos, rot, caches):
        """The logits of idx at text positions pos (T,), rotated by rot (see forward)."""
        x = self.transformer.drop(self.transformer.wte(idx))  # (B, T, C)
        shared = None
        for i, block in enumerate(self.transformer.h):
            leader = i % self.config.kv_share == 0
            x, shared = block(x, pos, rot, caches[i] if caches is not None else None, None if leader else shared)
        return self.lm_head(self.transformer.ln_f(x))

    def _rope(self, start, T):
        """Rotation table for positions start..start+T-1, sliced from a table that grows by
        doubling; recomputed when the frequencies change (load_state_dict)."""
        freqs = self.transformer.h[0].attn.rotary_emb.freqs
        key = (freqs.data_ptr(), freqs._version, freqs.device)
        table = self._rope_cache
        if table is None or table[0] != key or table[1].size(0) < start + T:
            n = max(start + T, 2 * table[1].size(0) if table is not None and table[0] == key else 1024)
            table = self._rope_cache = (key, rope_table(freqs, torch.arange(n, device=freqs.device)))
        return table[1][start:start + T]

    loss = staticmethod(loss_fn)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # one fused kernel for all parameters, where torch has one (CUDA, CPU), instead of a
        # loop of small operations per tensor: the optimizer step of a small model is mostly
        # per-operation overhead
        extra = dict(fused=True) if device_type in ("cuda", "cpu") else dict()
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
