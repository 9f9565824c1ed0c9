"""
loader.py's ByteLoader and fixed_batches: rows continue the text, restarts are marked and reported,
and the same seed (or a saved state) gives the same batches.

    python -m pytest -q tests/test_loader.py
"""
import io

import pytest
import torch

from loader import ByteLoader, decode, encode, fixed_batches
from utils import UserError


def layout(path):
    """The text as the loader reads it: "####" + text + "####" + text."""
    text = open(path, "rb").read()
    return (b"####" + text) * 2


def starts(loader):
    # where each row's last batch began: the position it advanced from
    return loader.state_dict()["pos"] - loader.block_size


def check_batch(data, x, y, restarted, begin):
    """Every row is the layout at its start, with "####" over the first bytes of a restarted row."""
    T = x.shape[1]
    for r in range(x.shape[0]):
        chunk = bytearray(data[begin[r]:begin[r] + T + 1])
        assert len(chunk) == T + 1  # never reads past the layout's end
        if restarted[r]:
            chunk[:4] = b"####"
        assert bytes(x[r].tolist()) == bytes(chunk[:-1])
        assert bytes(y[r].tolist()) == bytes(chunk[1:])


def test_rows_continue_and_restarts_are_reported(tiny_data_dir):
    path = str(tiny_data_dir / "train.txt")
    data = layout(path)
    loader = ByteLoader(path, block_size=32, batch_size=8, reset_prob=0.3, seed=0)
    x, y, restarted = loader.next()
    assert restarted.all() and restarted.dtype == torch.bool  # the first call starts every row
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.long
    n_restarts = 0
    for _ in range(200):
        previous_end = loader.state_dict()["pos"]
        prev_y = y
        x, y, restarted = loader.next()
        begin = starts(loader)
        check_batch(data, x, y, restarted, begin)
        # the report is true both ways: a row jumped exactly when it says so
        assert torch.equal(restarted, begin != previous_end)
        for r in range(8):
            if restarted[r]:
                assert decode(x[r, :4]) == "####"
            else:
                assert x[r, 0] == prev_y[r, -1]  # starts where the previous batch ended
        n_restarts += int(restarted.sum())
    assert 0.2 < n_restarts / (200 * 8) < 0.4  # about reset_prob


def test_restart_at_the_end(tmp_path):
    path = tmp_path / "small.txt"
    path.write_bytes(b"abcdefghijklmnopqrstuvwxyz0123456789")
    data = layout(str(path))
    loader = ByteLoader(str(path), block_size=8, batch_size=4, reset_prob=0.0, seed=3)
    loader.next()
    seen_wrap = seen_end_restart = False
    for _ in range(100):
        previous_end = loader.state_dict()["pos"]
        x, y, restarted = loader.next()
        check_batch(data, x, y, restarted, starts(loader))
        # with reset_prob 0 a row restarts only when it would run past the layout's end
        assert torch.equal(restarted, previous_end + 8 + 1 > len(data))
        seen_end_restart |= bool(restarted.any())
        seen_wrap |= any(b"9####a" in bytes(row.tolist()) for row in x)
    assert seen_end_restart and seen_wrap


def test_same_seed_same_batches_whatever_the_global_rng(tiny_data_dir):
    path = str(tiny_data_dir / "train.txt")
    a = ByteLoader(path, 16, 4, reset_prob=0.2, seed=7)
    b = ByteLoader(path, 16, 4, reset_prob=0.2, seed=7)
    c = ByteLoader(path, 16, 4, reset_prob=0.2, seed=8)
    differs = False
    for _ in range(20):
        torch.manual_seed(torch.randint(0, 1000, ()).item())  # disturb the global RNG
        xa, ya, ra = a.next()
        xb, yb, rb = b.next()
        xc, _, _ = c.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ra, rb)
        differs |= not torch.equal(xa, xc)
    assert differs


def test_state_dict_resumes_exactly(tiny_data_dir):
    path = str(tiny_data_dir / "train.txt")
    a = ByteLoader(path, 16, 4, reset_prob=0.3, seed=1)
    for _ in range(5):
        a.next()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # it goes into checkpoints, so it must load weights_only
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    expected = [a.next() for _ in range(10)]
    b = ByteLoader(path, 16, 4, reset_prob=0.3, seed=999)
    b.load_state_dict(state)
    for want, got in zip(expected, (b.next() for _ in range(10))):
        assert all(torch.equal(w, g) for w, g in zip(want, got))


def test_state_dict_with_more_rows_starts_the_new_ones(tiny_data_dir):
    path = str(tiny_data_dir / "train.txt")
    a = ByteLoader(path, 16, 2, reset_prob=0.0, seed=1)
    _, y, _ = a.next()
    b = ByteLoader(path, 16, 3, reset_prob=0.0, seed=1)
    b.load_state_dict(a.state_dict())
    x, _, restarted = b.next()
    assert restarted.tolist() == [False, False, True]
    assert torch.equal(x[:2, 0], y[:, -1])


def test_fixed_batches_are_fixed_and_continue_rows(tiny_data_dir):
    path = str(tiny_data_dir / "val.txt")
    first = fixed_batches(path, 32, 4, 6, seed=5, layout="rows")
    second = fixed_batches(path, 32, 4, 6, seed=5, layout="rows")
    for a, b in zip(first, second):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert first[0][2].all()
    for (_, y_prev, _), (x, _, restarted) in zip(first, first[1:]):
        assert not restarted.any()
        assert torch.equal(x[:, 0], y_prev[:, -1])


def test_random_fixed_batches_are_fixed_independent_windows_of_the_text(tiny_data_dir):
    """layout "random" (train.py's loss estimates without XL memory): every row of every batch is
    a window of the text as the loader lays it out, with no "####" of its own, at a place of its
    own; the same batches every call."""
    path = tiny_data_dir / "val.txt"
    text = path.read_bytes()
    layout = b"####" + text + b"####" + text
    first = fixed_batches(str(path), 32, 4, 6, seed=5)
    second = fixed_batches(str(path), 32, 4, 6, seed=5)
    for a, b in zip(first, second):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    starts = set()
    for x, y, _ in first:
        assert torch.equal(x[:, 1:], y[:, :-1])
        for r in range(4):
            window = bytes(x[r].tolist() + [y[r, -1].item()])
            assert window in layout and window[:4] != b"####", window
            starts.add(window)
    assert len(starts) == 24  # 6 batches x 4 rows, each somewhere else
    assert any(not torch.equal(x[:, 0], y_prev[:, -1]) for (_, y_prev, _), (x, _, _) in zip(first, first[1:]))


def test_bad_inputs_are_user_errors(tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(b"0123456789")
    with pytest.raises(UserError, match="missing"):
        ByteLoader(str(tmp_path / "nope.txt"), 8, 1)
    with pytest.raises(UserError, match="block_size"):
        ByteLoader(str(small), 64, 1)
    with pytest.raises(UserError, match="reset_prob"):
        ByteLoader(str(small), 4, 1, reset_prob=1.5)


def test_encode_decode_round_trip():
    text = "Švejk: „Poslušně hlásím“\n"
    ids = encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text.encode()),)
    assert decode(ids) == text
    assert decode(torch.tensor([104, 0xFF, 105])) == "h\\xffi"  # invalid UTF-8 survives
    assert encode("").shape == (0,)
