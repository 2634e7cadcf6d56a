"""`accelerate launch -m clipx.train --config FILE [key=value ...]`: the training entry point per process."""

import sys

from clipx.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
