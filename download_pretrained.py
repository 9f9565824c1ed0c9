"""
Download the tutorial's pretrained Shakespeare checkpoint (GPU recipe, 6x384) with gdown
into out_dir/ckpt.pt, then check that it loads.

    python download_pretrained.py
    python sample.py --out_dir=out-shakespeare-char
"""
import os
import shlex
import sys

from checkpoint import read_checkpoint
from configurator import configure
from outdir import make_folder
from utils import UserError, run_main

out_dir = "out-shakespeare-char"  # where ckpt.pt goes
drive_id = "14OPzCVBiCo-z9F6liAGAe0cyhPCtXycu"  # the tutorial's checkpoint on Google Drive
force = False  # replace an existing ckpt.pt


def main():
    configure(globals(), sys.argv[1:])
    target = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(target) and not force:
        raise UserError(f"{target} exists; pass --force=True to replace it")
    try:
        import gdown
    except ImportError:
        raise UserError("gdown is not installed: pip install -r requirements.txt (or pip install gdown)") from None
    made_dir = not os.path.isdir(out_dir)
    make_folder(out_dir)  # one clear line for a file in the way or a folder that cannot be written
    tmp = target + ".tmp"
    try:
        got = gdown.download(id=drive_id, output=tmp, quiet=False)
    except Exception as e:  # gdown raises many kinds of errors for network trouble
        got, detail = None, error_detail(e)
    else:
        detail = "gdown returned nothing"
    if not got or not os.path.isfile(tmp):
        clean_up(tmp, made_dir)
        raise UserError(f"could not download the checkpoint from Google Drive ({detail}); check the network, "
                        f"or copy the tutorial's ckpt.pt into {out_dir}/ by hand")
    try:
        read_checkpoint(tmp, option=None)  # refuse a broken or foreign file before it replaces anything
    except UserError:
        clean_up(tmp, made_dir)
        raise
    os.replace(tmp, target)
    print(f"saved {target}; try: python sample.py {shlex.quote('--out_dir=' + out_dir)}")


def error_detail(e):
    """The error's type and the message of its root cause, whole: a network error wraps the
    one that says what happened (a name that does not resolve, a refused connection)."""
    root = e
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    return f"{type(e).__name__}: {' '.join(str(root).split()) or type(root).__name__}"


def clean_up(tmp, made_dir):
    """Remove a partial download, and out_dir if this run made it and it is empty."""
    if os.path.exists(tmp):
        os.remove(tmp)
    if made_dir and not os.listdir(out_dir):
        os.rmdir(out_dir)


if __name__ == "__main__":
    run_main(main)
