"""Entry point for `python -m mbmamba_cli` (used by `torchrun -m mbmamba_cli`)."""

from mbmamba_cli.cli import main

if __name__ == "__main__":
    main()
