"""`python -m rnnkit`: the command line."""

from rnnkit.cli import main

if __name__ == "__main__":
    main(prog_name="rnnkit")
