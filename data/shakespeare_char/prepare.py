"""
Tiny-shakespeare as raw bytes: writes train.txt (first 90%) and val.txt (last 10%) next to this
file. Downloads input.txt from the char-rnn repository unless it is here, --input gives a copy,
or an offline copy lies in ../shared/data/shakespeare_char/ beside the project (as train.py finds it).
A download (the default one, or --url) is checked as an --input is: bytes that are not text, or
a text other than the input.txt already here, are refused unless --force=True.

    python data/shakespeare_char/prepare.py
    python data/shakespeare_char/prepare.py --input=../shared/data/shakespeare_char/input.txt
    python data/shakespeare_char/prepare.py --url=https://example.org/other.txt   # downloaded even if input.txt is here
"""
import os
import sys

# configurator, loader and utils live in the repo root, two levels up
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from configurator import configure
from loader import SOURCES, prepare
from utils import run_main

input = ""  # path of a local copy of the text, used instead of downloading it
url = SOURCES["shakespeare_char"]  # where input.txt is downloaded from (char-rnn's tiny-shakespeare)
force = False  # replace an input.txt that holds other text, or take an --input or download that is not text (NUL bytes)


def main():
    given = set()
    configure(globals(), sys.argv[1:], given=given)
    # a --url given is downloaded even when an input.txt is here (and checked against it); the
    # default one only when there is none
    prepare(os.path.dirname(os.path.abspath(__file__)), input_path=input or None, url=url, force=force,
            fetch="url" in given)


if __name__ == "__main__":
    run_main(main)
