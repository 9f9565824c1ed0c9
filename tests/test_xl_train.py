"""train.py --xl_mem: on a corpus where each block repeats the previous one (with a few
changes), only a model that sees the previous batch through its memory can predict."""

import re

import pytest

from conftest import TINY, assert_user_error, run_script, train, write_splits
from exercises.checks_common import repeating_text

BLOCK = 32


@pytest.fixture(scope="module")
def repeat_dir(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp("repeat"), bytes(repeating_text(3000, BLOCK).tolist()))


def final(pattern, printed):
    return float(re.findall(pattern, printed)[-1])


@pytest.mark.slow
def test_memory_learns_what_no_single_batch_shows(repeat_dir, tmp_path):
    common = [f"--block_size={BLOCK}", "--batch_size=16", "--reset_prob=0.0", "--max_iters=300",
              "--eval_interval=300", "--eval_iters=16", "--learning_rate=2e-3", "--warmup_iters=20",
              "--lr_decay_iters=300", "--n_layer=1", "--n_head=4", "--n_embd=64", "--tensorboard=False"]
    with_mem = train(repeat_dir, tmp_path / "xl", *common, "--xl_mem=32")
    without = train(repeat_dir, tmp_path / "plain", *common)
    loss_mem = final(r"val loss with memory (\d+\.\d+)", with_mem)
    loss_plain = final(r"val loss (\d+\.\d+)", without)
    # no memory: the best is the letter frequencies, ~ln 16 = 2.77; with memory: copy 32 back
    assert loss_plain > 2.4
    assert loss_mem < loss_plain - 1.0, (loss_mem, loss_plain)


def test_xl_runs_with_gqa_windows_sharing_and_resume(repeat_dir, tmp_path):
    args = ["--xl_mem=48", "--n_layer=4", "--n_head=4", "--n_kv_head=2", "--window=16",
            "--global_layers=0,1", "--kv_share=2", "--max_iters=4"]
    printed = train(repeat_dir, tmp_path / "o", *args)
    assert "val loss with memory" in printed
    printed = train(repeat_dir, tmp_path / "o", *args, "--init_from=resume", "--resume_checkpoint_name=last",
                    "--max_iters=8")
    assert "continue" in printed and "iter 8" in printed and "XL memory restored" in printed
    # other rows (another batch_size): the memory cannot go on with them, and the line says so
    printed = train(repeat_dir, tmp_path / "o", *args, "--init_from=resume", "--resume_checkpoint_name=last",
                    "--max_iters=10", "--batch_size=3")
    assert "note: XL memory starts empty" in printed and "XL memory restored" not in printed


def test_negative_xl_mem_is_one_clear_error(tmp_path):
    assert_user_error(run_script("train.py", "--xl_mem=-1", f"--out_dir={tmp_path}"), "xl_mem")



def test_a_resume_asks_for_the_xl_plugin_again(repeat_dir, tmp_path):
    """A checkpoint names the XL step it was trained with (here kv.xl's own, named as a
    plug-in); a resume runs that code only when the command line names it too."""
    out, args = tmp_path / "o", ["--xl_mem=16", "--n_layer=1", "--xl_update=kv.xl:xl_step"]
    train(repeat_dir, out, *args, "--max_iters=2")
    proc = run_script("train.py", "--device=cpu", f"--dataset={repeat_dir}", f"--out_dir={out}",
                      "--init_from=resume", "--max_iters=4")
    assert_user_error(proc, "--xl_update=kv.xl:xl_step", "pass it again")
    printed = train(repeat_dir, out, *args, "--init_from=resume", "--max_iters=4")
    assert "iter 4" in printed and "from the checkpoint" not in printed


def test_an_xl_step_without_xl_memory_is_one_error(repeat_dir, tmp_path):
    """--xl_update on a run that keeps no memory would never be called: one line that says how
    to give it one, and nothing written; on a resume of an XL run its xl_mem counts."""
    proc = run_script("train.py", *TINY, f"--dataset={repeat_dir}", f"--out_dir={tmp_path / 'o'}", "--max_iters=2",
                      "--xl_update=kv.xl:xl_step")
    assert_user_error(proc, "--xl_update=kv.xl:xl_step replaces the XL memory's step", "add --xl_mem=N")
    assert not (tmp_path / "o").exists()
