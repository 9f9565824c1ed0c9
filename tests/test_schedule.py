"""schedule.py: the learning rate follows its definition (a linear warm-up to learning_rate,
a cosine down to min_lr at lr_decay_iters), and a fine-tune's fitted schedule keeps what the
command line sets. The notes train.py prints are tested end to end in test_train.py."""
import math

import pytest

from schedule import Schedule


def test_warm_up_then_cosine_then_min_lr():
    s = Schedule(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    warm = [s.lr(i) for i in range(10)]
    assert all(b > a for a, b in zip(warm, warm[1:])) and warm[-1] < s.learning_rate
    assert warm[1] - warm[0] == pytest.approx(warm[9] - warm[8])  # linear
    assert s.lr(10) == pytest.approx(s.learning_rate)  # the peak, where the cosine starts
    assert s.lr(60) == pytest.approx((s.learning_rate + s.min_lr) / 2)  # half way through the cosine
    decay = [s.lr(i) for i in range(10, 111)]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    # the cosine is symmetric about its middle: as far above the half-way rate at 35 as below it at 85
    mid = (s.learning_rate + s.min_lr) / 2
    assert s.lr(35) - mid == pytest.approx(mid - s.lr(85))
    assert s.lr(110) == s.lr(10_000) == s.min_lr


def test_no_decay_keeps_the_peak_after_the_warm_up():
    s = Schedule(learning_rate=3e-4, min_lr=1e-5, warmup_iters=5, lr_decay_iters=50, decay_lr=False)
    assert s.lr(4) < 3e-4 and {s.lr(i) for i in (5, 49, 50, 500)} == {3e-4}
    assert s.run_note(0, 20, 0, "scratch") is None  # no decay, nothing to end at min_lr


def test_a_fine_tune_fits_its_iterations_unless_a_flag_is_given():
    s = Schedule(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=5000)
    fit, note = s.fit(200, flags=set())
    assert fit == {"warmup_iters": 20, "lr_decay_iters": 200} and "fits its 200 iterations: warm-up 20" in note
    fitted = Schedule(**{**s.__dict__, **fit})
    assert fitted.lr(199) > fitted.min_lr and fitted.lr(200) == fitted.min_lr
    assert fitted.run_note(0, 200, 0, "finetune") is None  # it ends where it should: no note
    fit, _ = s.fit(200, flags={"warmup_iters"})
    assert fit == {"lr_decay_iters": 200}
    assert s.fit(200, flags={"warmup_iters", "lr_decay_iters"}) == ({}, None)


def test_a_run_shorter_than_its_warm_up_says_it_ends_warming_up():
    """5 iterations under warmup_iters=100 end at 5/101 of the peak rate, which may read close
    to min_lr: the note says the run ends inside its warm-up."""
    s = Schedule(learning_rate=2e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=5000)
    assert "(still warming up: warmup_iters=100" in s.run_note(0, 5, 0, "scratch")
    assert "still warming up" not in Schedule(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10,
                                              lr_decay_iters=1000).run_note(0, 100, 0, "scratch")


def test_the_run_note_proposes_flags_that_end_lower():
    s = Schedule(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=1000)
    note = s.run_note(0, 100, 0, "scratch")
    assert note.startswith(f"note: this run's 100 iterations end at learning rate {s.lr(99):.2e}, not min_lr")
    proposed = Schedule(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=100)
    assert note.endswith(f"; with --lr_decay_iters=100 it ends at {proposed.lr(99):.2e}")
    assert proposed.lr(99) < s.lr(99) and math.isclose(proposed.lr(100), s.min_lr)
    assert s.run_note(0, 1, 0, "scratch").startswith("note: this run's 1 iteration ends at learning rate")
    # a run resumed part-way keeps its schedule: the note says where it ends, and proposes nothing
    assert "; with " not in s.run_note(50, 100, 0, "continue")
