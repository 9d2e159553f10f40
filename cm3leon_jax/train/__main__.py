"""`python -m cm3leon_jax.train ...` == `cm3leon train ...`."""
import sys

from cm3leon_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
