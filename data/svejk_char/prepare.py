"""
The Good Soldier Svejk as raw bytes: writes train.txt (first 90%) and val.txt (last 10%) next to
this file. There is no download source, so give a plain-text copy of the novel once with --input
(one in ../shared/data/svejk_char/, beside the project, is taken without it).

    python data/svejk_char/prepare.py --input=../shared/data/svejk_char/input.txt
    python data/svejk_char/prepare.py          # re-split an input.txt already copied here (or take ../shared's)
"""
import os
import sys

# configurator, loader and utils live in the repo root, two levels up
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from configurator import configure
from loader import prepare
from utils import run_main

input = ""  # path of a plain-text copy of the novel, copied here as input.txt
force = False  # replace an input.txt that holds other text, or take an --input that is not text (NUL bytes)


def main():
    configure(globals(), sys.argv[1:])
    prepare(os.path.dirname(os.path.abspath(__file__)), input_path=input or None, force=force)


if __name__ == "__main__":
    run_main(main)
