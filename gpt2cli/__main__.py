"""`python -m gpt2cli` is the `gpt2` command (and what `torchrun -m gpt2cli` runs)."""

from gpt2cli.cli.app import main

if __name__ == "__main__":
    main()
