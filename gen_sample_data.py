"""
Show what the training data loader emits: consecutive batches, one line per row, so you can see
that each row continues the text of the previous batch, and where a row restarts elsewhere
("[restart]", and its first 4 bytes are "####"). Newlines, carriage returns and tabs are shown
as \\n, \\r and \\t, and bytes that are not UTF-8 (a character cut at a row's edge) as \\xNN.

    python gen_sample_data.py
    python gen_sample_data.py --reset_prob=0.1 --block_size=32 --n_batches=40
    python gen_sample_data.py --dataset=svejk_char --split=val --batch_size=2
"""
import sys

from configurator import configure
from loader import ByteLoader, dataset_paths, decode
from devices import use_threads
from utils import SEED_MAX, UserError, check_range, run_main

dataset = "shakespeare_char"  # a name under data/, or a directory holding train.txt and val.txt
split = "train"  # train or val
block_size = 64  # bytes per row
batch_size = 1  # rows per batch
reset_prob = 0.3  # chance that a row jumps to a random offset at each batch
n_batches = 20  # how many consecutive batches to print
seed = 1337  # seed of the loader's row starts and jumps
threads = 0  # torch's CPU threads (0 = automatic: OMP_NUM_THREADS, else the CPUs not busy with other work)


def main():
    configure(globals(), sys.argv[1:])
    use_threads(threads)
    if split not in ("train", "val"):
        raise UserError(f"--split={split}: use train or val")
    if n_batches < 1:
        raise UserError(f"--n_batches must be at least 1 (the batches to print), got {n_batches}")
    check_range(globals(), "seed", -SEED_MAX, SEED_MAX)
    train_path, val_path = dataset_paths(dataset)
    loader = ByteLoader(train_path if split == "train" else val_path, block_size, batch_size,
                        reset_prob=reset_prob, seed=seed)
    for i in range(n_batches):
        x, _, restarted = loader.next()
        for r in range(batch_size):
            text = decode(x[r]).replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
            row = f" row {r}" if batch_size > 1 else ""
            mark = "[restart]" if restarted[r] else "         "
            print(f"batch {i:3d}{row} {mark} |{text}|")


if __name__ == "__main__":
    run_main(main)
