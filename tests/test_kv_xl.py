"""kv/xl.py: TransformerXL memory at the model level: a step with memory is a forward over
[memory, batch] with the memory detached; restarted rows see no memory."""

import pytest
import torch

from conftest import text, tiny
from kv.xl import make_xl_memory, memory_bytes, memory_state

TOL = dict(atol=1e-5, rtol=1e-4)  # gradients summed over more terms than the logits


def detach_prefix_hooks(model, n):
    """Make every layer's q, k, v of the first n positions constants (no gradient)."""
    def hook(mod, args, out):
        return torch.cat([out[:, :n].detach(), out[:, n:]], dim=1)
    return [b.attn.c_attn.register_forward_hook(hook) for b in model.transformer.h]


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2, kv_share=2), dict(window=5, global_layers="1"),
                                dict(attention="linear", linear_layers="0")],
                         ids=["mha", "gqa+share", "window", "hybrid-linear"])
def test_xl_step_equals_forward_over_memory_and_batch_with_memory_detached(kw):
    m = tiny(**kw).train()  # as train.py runs it (no dropout: the same numbers)
    g = torch.Generator().manual_seed(1)
    A, B = torch.randint(0, 256, (2, 16), generator=g), torch.randint(0, 256, (2, 16), generator=g)
    targets = torch.randint(0, 256, (2, 16), generator=g)
    memory = make_xl_memory(m, 2, mem_len=16)
    m(A, memory)  # step 1 fills the memory
    logits, _ = m(B, memory)  # step 2 attends over [memory of A, B]
    m.zero_grad()
    m.loss(logits, targets).backward()
    xl_grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    hooks = detach_prefix_hooks(m, 16)
    ref_logits, _ = m(torch.cat([A, B], dim=1))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(logits, ref_logits[:, 16:], **TOL)
    m.zero_grad()
    m.loss(ref_logits[:, 16:], targets).backward()
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(xl_grads[n], p.grad, **TOL)


def test_memory_keeps_only_mem_len_and_restarted_rows_see_none():
    m = tiny(n_layer=1)  # one layer: a memory key depends only on its token and position
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 256, (3, 8), generator=g) for _ in range(3)]
    memory = make_xl_memory(m, 3, mem_len=12)
    m(batches[0], memory)
    m(batches[1], memory)
    assert memory[0].tokens() == 12
    restarted = torch.tensor([False, True, False])
    for s in memory:
        s.restart(restarted)
    logits, _ = m(batches[2], memory)
    alone, _ = m(batches[2])
    torch.testing.assert_close(logits[1], alone[1], **TOL)  # the restarted row: no memory
    assert not torch.allclose(logits[0], alone[0], atol=1e-3)  # the others use theirs
    # with memory cut to the last 12 tokens, rows 0 and 2 equal a forward over those tokens
    text = torch.cat(batches, dim=1)
    ref, _ = m(text[:, 4:])  # memory = bytes 4..15, batch = 16..23
    torch.testing.assert_close(logits[[0, 2]], ref[[0, 2], -8:], **TOL)


@pytest.mark.parametrize("norm", ["layernorm", "denominator"])  # (the denominator reads z: restart clears it too)
def test_linear_memory_restarted_rows_see_none(norm):
    """A linear layer's memory is its state (S, z), the whole history: after restart(rows) a
    restarted row computes what a fresh state at the same positions computes, and the other
    rows what a forward over all their batches computes."""
    m = tiny(attention="linear", linear_norm=norm)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 256, (3, 8), generator=g) for _ in range(3)]
    memory = make_xl_memory(m, 3, mem_len=12)
    m(batches[0], memory)
    m(batches[1], memory)
    for s in memory:
        s.restart(torch.tensor([False, True, False]))
    logits, _ = m(batches[2], memory)
    fresh = make_xl_memory(m, 3, mem_len=12)
    for s in fresh:
        s.seen = 16  # the same positions 16..23, nothing remembered
    alone, _ = m(batches[2], fresh)
    torch.testing.assert_close(logits[1], alone[1], **TOL)  # the restarted row: no memory
    assert not torch.allclose(logits[0], alone[0], atol=1e-3)  # the others use theirs
    ref, _ = m(torch.cat(batches, dim=1))
    torch.testing.assert_close(logits[[0, 2]], ref[[0, 2], -8:], **TOL)


def test_long_training_keeps_positions_small():
    m = tiny()
    memory = make_xl_memory(m, 1, mem_len=8)
    for _ in range(50):
        m(torch.randint(0, 256, (1, 8)), memory)
    assert memory[0].seen == 8


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2, kv_share=2), dict(attention="linear", linear_layers="0")],
                         ids=["mha", "gqa+share", "hybrid-linear"])
def test_memory_bytes_is_what_a_full_memory_puts_in_a_checkpoint(kw):
    """outdir.check_space counts memory_bytes per checkpoint: it must equal the bytes of
    memory_state's tensors once every layer remembers mem_len tokens."""
    m = tiny(**kw).eval()
    memory = make_xl_memory(m, 3, mem_len=8)
    with torch.no_grad():
        for _ in range(2):
            m(text(B=3, T=6), memory)  # 12 tokens: more than mem_len
    held = sum(v.numel() * v.element_size() for state in memory_state(memory) for v in state.values()
               if torch.is_tensor(v))
    assert held == memory_bytes(m, 3, 8)
