"""
Download the tutorial's pretrained Shakespeare checkpoint (GPU recipe, 6x384) with gdown
into out_dir/ckpt.pt, then check that it loads.

    python download_pretrained.py
    python sample.py --out_dir=out-shakespeare-char
"""
import os
import sys

from checkpoint import read_checkpoint
from configurator import configure
from utils import UserError, run_main

out_dir = "out-shakespeare-char"  # where ckpt.pt goes
drive_id = "14OPzCVBiCo-z9F6liAGAe0cyhPCtXycu"  # the tutorial's checkpoint on Google Drive
force = False  # replace an existing ckpt.pt


def main():
    configure(globals(), sys.argv[1:])
    target = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(target) and not force:
        raise UserError(f"{target} exists; pass --force=True to replace it")
    os.makedirs(out_dir, exist_ok=True)
    import gdown
    tmp = target + ".tmp"
    try:
        got = gdown.download(id=drive_id, output=tmp, quiet=False)
    except Exception as e:  # gdown raises many kinds of errors for network trouble
        got, detail = None, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    else:
        detail = "gdown returned nothing"
    if not got or not os.path.isfile(tmp):
        raise UserError(f"could not download the checkpoint ({detail}); check the network, "
                        f"or copy ckpt.pt into {out_dir}/ by hand")
    try:
        read_checkpoint(tmp)  # refuse a broken or foreign file before it replaces anything
    except UserError:
        os.remove(tmp)
        raise
    os.replace(tmp, target)
    print(f"saved {target}; try: python sample.py --out_dir={out_dir}")


if __name__ == "__main__":
    run_main(main)
