"""
train.py's learning-rate schedule: a linear warm-up, then a cosine down to min_lr at
lr_decay_iters (or the peak rate throughout after the warm-up, decay_lr=False), and the notes
train.py prints where a run's schedule does not end where its settings suggest.

    s = Schedule(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=5000)
    s.lr(0), s.lr(2550), s.lr(5000)   # 9.9e-06, 5.5e-04 (half way down), 1e-04
"""
import math
from dataclasses import dataclass, replace

KEYS = ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "decay_lr")  # train.py's settings it reads


@dataclass(frozen=True)
class Schedule:
    learning_rate: float = 1e-3  # the peak rate, reached at the end of the warm-up
    min_lr: float = 1e-4  # where the cosine ends
    warmup_iters: int = 100  # iterations of the linear warm-up
    lr_decay_iters: int = 5000  # the iteration (from the schedule's origin) at which min_lr is reached
    decay_lr: bool = True  # False: learning_rate after the warm-up

    @classmethod
    def from_settings(cls, settings):
        return cls(**{k: settings[k] for k in KEYS})

    def lr(self, it):
        """The learning rate at iteration `it` of the schedule (0 = its first)."""
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        if not self.decay_lr:
            return self.learning_rate
        if it >= self.lr_decay_iters:
            return self.min_lr
        progress = (it - self.warmup_iters) / max(1, self.lr_decay_iters - self.warmup_iters)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.learning_rate - self.min_lr)

    def fit(self, iters, flags):
        """A fine-tune's fresh schedule, fitted to its own `iters`: a warm-up of a tenth (at most
        warmup_iters) and the cosine down to min_lr at its end, not at the lr_decay_iters meant for
        the run from scratch. A setting named in `flags` (given on the command line) is kept.
        Returns the settings changed ({} for none) and the note that says so (None for none)."""
        fit = {"warmup_iters": min(self.warmup_iters, max(1, iters // 10)), "lr_decay_iters": iters}
        fit = {k: v for k, v in fit.items() if k not in flags and v != getattr(self, k)}
        if not fit:
            return {}, None
        s = replace(self, **fit)
        end = ("cosine to min_lr at its end" if s.warmup_iters < iters else
               f"no cosine: the warm-up takes them all, the rate climbing to {s.lr(iters - 1):.2e} "
               f"(learning_rate={s.learning_rate:g})")
        return fit, (f"note: the fine-tune's schedule fits its {iters} iterations: warm-up {s.warmup_iters}, {end} "
                     "(--warmup_iters and --lr_decay_iters set them)")

    def run_note(self, start_iter, end_iter, origin, mode):
        """The note for a run of iterations start_iter..end_iter-1 on the schedule begun at
        `origin` (mode: 'scratch', 'continue' or 'finetune') whose rate does not end at min_lr
        as its settings suggest, with the flags that would make it; None when it does."""
        if not self.decay_lr:
            return None
        run = end_iter - origin  # the schedule's iterations
        if self.lr_decay_iters > run or self.warmup_iters >= run:  # it ends above min_lr
            warmup_fix = max(1, run // 10) if self.warmup_iters >= run else self.warmup_iters
            fix = f"--lr_decay_iters={run}" + (f" --warmup_iters={warmup_fix}" if warmup_fix != self.warmup_iters
                                               else "")
            end = self.lr(run - 1)
            end_fixed = replace(self, warmup_iters=warmup_fix, lr_decay_iters=run).lr(run - 1)
            its = f"{run} iteration{'s' if run != 1 else ''}"
            span = f"this run's {its}" if start_iter == origin else \
                f"the schedule's {its} ({origin + 1}..{end_iter}, this run resuming after {start_iter})"
            fits = end_fixed < end and start_iter == origin  # (a continued run keeps its schedule: no advice)
            where = "still warming up: " if self.warmup_iters >= run else ""  # (a run shorter than its warm-up)
            return (f"note: {span} end{'s' if run == 1 else ''} at learning rate {end:.2e}, not min_lr={self.min_lr:g} "
                    f"({where}warmup_iters={self.warmup_iters}, lr_decay_iters={self.lr_decay_iters})"
                    + (f"; with {fix} it ends at {end_fixed:.2e}" if fits else ""))
        if mode == "continue" and start_iter >= self.lr_decay_iters:
            return (f"note: the schedule reached min_lr={self.min_lr:g} at iteration {self.lr_decay_iters}: every "
                    f"iteration of this continued run trains at it; --resume_mode=finetune "
                    f"--max_iters={end_iter - start_iter} trains as many with a fresh warm-up and decay")
        if self.lr_decay_iters <= self.warmup_iters and start_iter == origin:  # no cosine then
            # (a continued run keeps its schedule: no advice)
            return (f"note: lr_decay_iters={self.lr_decay_iters} ends before warm-up does (warmup_iters="
                    f"{self.warmup_iters}): the learning rate drops from {self.learning_rate:g} to min_lr="
                    f"{self.min_lr:g} at once after warm-up; --lr_decay_iters={run} decays it over the run")
        return None
