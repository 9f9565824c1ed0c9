"""
Download the tutorial's pretrained Shakespeare checkpoint (GPU recipe, 6x384) with gdown
into out_dir/ckpt.pt, after checking that the model it describes loads from it.

    python download_pretrained.py
    python sample.py --out_dir=out-shakespeare-char
"""
import os
import shlex
import sys

from checkpoint import load_model, read_checkpoint
from configurator import configure
from outdir import make_folder
from utils import UserError, project_file, run_main

out_dir = "out-shakespeare-char"  # where ckpt.pt goes
drive_id = "14OPzCVBiCo-z9F6liAGAe0cyhPCtXycu"  # the tutorial's checkpoint on Google Drive
force = False  # replace an existing ckpt.pt


def main():
    configure(globals(), sys.argv[1:])
    target = os.path.join(out_dir, "ckpt.pt")
    if not drive_id.strip():
        raise UserError("--drive_id is empty: give the Google Drive id of the file (leave the option out for "
                        "the tutorial's checkpoint)")
    if os.path.isdir(target):
        raise UserError(f"{target} is a folder, not a checkpoint file: move it away, or use another --out_dir")
    if os.path.exists(target) and not force:
        raise UserError(f"{target} exists; pass --force=True to replace it")
    try:
        import gdown
    except ImportError:
        raise UserError("gdown is not installed: pip install -r requirements.txt (or pip install gdown)") from None
    made = outermost_missing(out_dir)  # the first folder this run makes (None: out_dir is there), removed if left empty
    make_folder(out_dir)  # one clear line for a file in the way or a folder that cannot be written
    tmp = target + ".tmp"
    try:
        try:
            got = gdown.download(id=drive_id, output=tmp, quiet=False)
        except Exception as e:  # gdown raises many kinds of errors for network trouble
            got, detail = None, error_detail(e)
        else:
            detail = "gdown returned nothing"
        if not got or not os.path.isfile(tmp):
            raise UserError(f"could not download the checkpoint from Google Drive ({detail}); check the network, "
                            f"or copy the tutorial's ckpt.pt into {out_dir}/ by hand")
        try:
            read_checkpoint(tmp, option=None)  # refuse a broken or foreign file before it replaces anything
        except UserError as e:
            why = str(e).split(" (", 1)[1].rsplit(")", 1)[0] if " (" in str(e) else str(e)
            raise UserError(f"the file Google Drive sent is not a checkpoint ({why}; a page saying the download "
                            f"quota is exceeded looks like this): try again later, or copy the tutorial's ckpt.pt "
                            f"into {out_dir}/ by hand") from None
        try:
            load_model(tmp, option=None)  # and a checkpoint whose weights are not the model it describes
        except UserError as e:
            raise UserError(f"the file Google Drive sent is a checkpoint, but not one this project can load "
                            f"({str(e).replace(tmp, 'it')}): check --drive_id, or copy the tutorial's ckpt.pt into "
                            f"{out_dir}/ by hand") from None
        os.replace(tmp, target)
    except BaseException:  # an error, or Ctrl-C mid-download: leave nothing half-written behind
        clean_up(tmp, made, out_dir)
        raise
    print(f"saved {target}; try: python {project_file('sample.py')} {shlex.quote('--out_dir=' + out_dir)}")


def outermost_missing(folder):
    """The outermost folder of the path `folder` that does not exist yet (None: it exists)."""
    folder, missing = os.path.abspath(folder), None
    while not os.path.exists(folder):
        folder, missing = os.path.dirname(folder), folder
    return missing


def error_detail(e):
    """The error's type and the message of its root cause, whole: a network error wraps the
    one that says what happened (a name that does not resolve, a refused connection)."""
    root = e
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    return f"{type(e).__name__}: {' '.join(str(root).split()) or type(root).__name__}"


def clean_up(tmp, made, folder_made):
    """Remove a partial download (gdown's own partial file too: tmp + 8 characters + .part),
    then the folders this run made (from folder_made up to `made`), where nothing else is in them."""
    folder, name = os.path.split(tmp)
    for f in os.listdir(folder) if os.path.isdir(folder) else []:
        if f == name or f.startswith(name) and f.endswith(".part"):
            os.remove(os.path.join(folder, f))
    if made is None:
        return
    here = os.path.abspath(folder_made)
    while os.path.isdir(here) and not os.listdir(here):
        os.rmdir(here)
        if here == made:
            break
        here = os.path.dirname(here)


if __name__ == "__main__":
    run_main(main)
