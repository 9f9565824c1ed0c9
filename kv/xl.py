"""
TransformerXL memory for training: each layer attends to the detached keys and values of
the previous batches of the same loader rows (which continue the same text).

    from kv.xl import make_xl_memory
    memory = make_xl_memory(model, batch_size, mem_len=256)
    logits, memory = model(x, memory)    # each step; steps.restart_rows(memory, rows) where rows jumped
"""

import torch

from kv.cache import Cache, attention_mask, visible
from rope import apply_rope, rope_table
from utils import UserError


def xl_step(mem_k, mem_v, mem_ok, k, v, mem_len):
    """One TransformerXL memory step as a plain function (what XLMemory calls; exercise 2).
    mem_k, mem_v (B, nkv, m, hs): K/V kept from earlier batches; mem_ok (B, m): False where
    the row has since restarted; k, v (B, nkv, T, hs): this batch. Returns
    keys, values (B, nkv, m+T, hs) to attend over, key_ok (B, m+T), and the new memory:
    the last min(mem_len, m+T) of them, detached (no gradient into the past), with its ok."""
    keys, vals = torch.cat([mem_k, k], dim=2), torch.cat([mem_v, v], dim=2)
    key_ok = torch.cat([mem_ok, mem_ok.new_ones(mem_ok.size(0), k.size(2))], dim=1)
    cut = keys.size(2) - min(mem_len, keys.size(2))
    return keys, vals, key_ok, keys[:, :, cut:].detach(), vals[:, :, cut:].detach(), key_ok[:, cut:]


def check_step(name, out, k, m, mem_len):
    """A UserError naming what a user's step function (named `name`, e.g. "--xl_update=mod:fn")
    returned against xl_step's contract: six tensors of the shapes its docstring gives, on k's
    device, the flags bool and the others in k's dtype, the new memory detached (else the next
    step's backward runs into this one)."""
    B, H, T, D = k.shape
    kept = min(mem_len, m + T)
    if not (isinstance(out, (tuple, list)) and len(out) == 6 and all(torch.is_tensor(t) for t in out)):
        got = f"{type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
        raise UserError(f"{name} must return six tensors (keys, vals, key_ok, new_k, new_v, new_ok), "
                        f"as kv/xl.py's xl_step does; it returned a {got}")
    names = ("keys", "vals", "key_ok", "new_k", "new_v", "new_ok")
    shapes = ((B, H, m + T, D), (B, H, m + T, D), (B, m + T), (B, H, kept, D), (B, H, kept, D), (B, kept))
    for what, t, shape in zip(names, out, shapes):
        if tuple(t.shape) != shape:
            raise UserError(f"{name}: {what} must be shaped {shape} (B={B}, {m} tokens remembered, T={T} new, "
                            f"mem_len={mem_len}); it is {tuple(t.shape)}")
    for what, t in zip(names, out):
        dtype = torch.bool if what.endswith("ok") else k.dtype
        if t.dtype != dtype or t.device != k.device:
            raise UserError(f"{name}: {what} must be {dtype} on {k.device} (as k), not {t.dtype} on {t.device}")
    if torch.is_grad_enabled() and (out[3].requires_grad or out[4].requires_grad):
        raise UserError(f"{name}: new_k and new_v must be cut off from the autograd graph (.detach()); "
                        "else the next step's backward runs into this step's graph")


class XLMemory(Cache):
    """TransformerXL-style memory for training: the keys/values of the previous steps'
    batches (the same loader rows, which continue the same text), detached so that no
    gradient flows into them, at most `mem_len` tokens.

    Each step the batch is placed right after the memory: memory at positions
    0..m-1, batch at m..m+T-1 (so `seen` = m). Stored keys are rotated, so keeping the
    last mem_len of them re-bases their positions with one rotation by -(m + T - mem_len):
    positions stay small however long training runs (float32 angles would lose precision
    at millions of tokens). Rows that the loader restarted lose their memory
    (`restart(rows)`), so no row attends to another stretch of text."""

    state_keys = ("k", "v", "valid")  # what a checkpoint keeps (memory_state)

    def __init__(self, batch_size, n_kv_head, head_dim, mem_len, window=0, rope_fn=None,
                 step_fn=xl_step, dtype=torch.float32, device="cpu", step_name=None):
        self.mem_len, self.window, self.rope_fn, self.step_fn = mem_len, window, rope_fn, step_fn
        self.step_name = step_name  # a user's step_fn, by name: what it returns is checked (check_step)
        self.k = torch.zeros(batch_size, n_kv_head, 0, head_dim, dtype=dtype, device=device)
        self.v = self.k
        self.valid = torch.ones(batch_size, 0, dtype=torch.bool, device=device)  # (B, m) per slot

    @property
    def seen(self):
        return self.k.size(2)

    def restart(self, rows):
        """rows: bool (B,), True where the loader jumped to another place in the text."""
        self.valid = self.valid & ~rows.to(self.valid.device)[:, None]

    def update(self, k, v):
        m, T = self.k.size(2), k.size(2)
        if m == 0:  # nothing to remember yet (and the batch may be in another dtype)
            self.k, self.v = self.k.to(k.dtype), self.v.to(v.dtype)
        out = self.step_fn(self.k, self.v, self.valid, k, v, self.mem_len)
        if self.step_name is not None:
            check_step(self.step_name, out, k, m, self.mem_len)
        keys, vals, key_ok, new_k, new_v, self.valid = out
        pos = torch.arange(m + T, device=k.device)
        if m > 0:  # (B, 1, T, m + T): no memory of another text
            mask = visible(pos[m:], pos, self.window) & key_ok[:, None, None, :]
        else:
            mask = attention_mask(pos, pos, self.window)
        shift = m + T - new_k.size(2)  # re-base the kept keys to positions 0..kept-1
        if shift and self.rope_fn is not None:
            new_k = self.rope_fn(new_k, -shift)
        self.k, self.v = new_k, new_v
        self.key_pos = pos  # (memory, then the batch: the model's positions start at seen = m)
        return keys, vals, mask

    def tokens(self):
        return self.k.size(2)

    def size_bits(self):
        return 2 * self.k.numel() * self.k.element_size() * 8


def make_xl_memory(model, batch_size, mem_len, step_fn=None, step_name=None):
    """One XLMemory per softmax layer (one per kv_share group), the fixed-size state for
    linear layers. step_fn replaces xl_step (same signature), e.g. a student's version;
    with step_name (e.g. "--xl_update=mod:fn") what it returns is checked, errors naming it."""
    c = model.config
    p = next(model.parameters())
    freqs = model.transformer.h[0].attn.rotary_emb.freqs
    shift = lambda k, d: apply_rope(k, rope_table(freqs, torch.tensor([d], device=k.device)))
    memory = []
    for i, block in enumerate(model.transformer.h):
        if i % c.kv_share:
            memory.append(memory[-1])
        elif c.keeps_state(i):  # linear attention's sums (its layer class makes it)
            memory.append(block.attn.make_state(c, batch_size, p.dtype, p.device))
        else:
            memory.append(XLMemory(batch_size, c.kv_heads, c.head_dim, mem_len, window=block.attn.window,
                                   rope_fn=shift if c.rope else None, step_fn=step_fn or xl_step,
                                   dtype=p.dtype, device=p.device, step_name=step_name))
    return memory


def try_step(model, mem_len, step_fn, step_name, device):
    """Run a user's step_fn (make_xl_memory) on 2 bytes twice, with nothing remembered and
    then with memory, gradients on (to see the memory cut from them): a UserError now (or the
    plug-in's own error) rather than after the first evaluation. Leaves the model training."""
    memory = make_xl_memory(model, 1, mem_len, step_fn, step_name)
    for _ in range(2):
        model.eval()(torch.zeros(1, 2, dtype=torch.long, device=device), memory)
    model.train()


def memory_state(memory):
    """What a checkpoint keeps of make_xl_memory's list: each distinct layer state's tensors,
    so that a resumed run attends to the same past as the uninterrupted one."""
    return [{k: getattr(c, k) for k in c.state_keys} for c in {id(c): c for c in memory}.values()]


def memory_bytes(model, batch_size, mem_len):
    """The bytes memory_state holds once every layer remembers mem_len tokens: what the XL
    memory adds to each checkpoint (outdir.check_space). In the parameters' dtype: under
    16-bit autocast the memory holds half as many bytes, so this is then an upper bound."""
    total = 0
    for c in {id(c): c for c in make_xl_memory(model, batch_size, mem_len)}.values():
        if isinstance(c, XLMemory):  # keys and values (B, nkv, mem_len, hs), valid (B, mem_len)
            B, nkv, _, hs = c.k.shape
            total += 2 * B * nkv * mem_len * hs * c.k.element_size() + B * mem_len
        else:
            total += (c.S.numel() + c.z.numel()) * c.S.element_size()
    return total


def load_memory_state(memory, state):
    """Put memory_state's tensors back into a fresh make_xl_memory list for the same model,
    batch size and mem_len."""
    for c, saved in zip({id(c): c for c in memory}.values(), state, strict=True):
        for k in c.state_keys:
            v = saved[k]
            setattr(c, k, v.to(getattr(c, k).device) if torch.is_tensor(v) else v)
