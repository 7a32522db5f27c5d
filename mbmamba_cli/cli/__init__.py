"""The `mbmamba` command: thin Typer commands that parse options and call the library.

Each command imports its heavy modules inside the function, so `mbmamba deblur --help` works even
when an optional dependency of another command (training, video) is missing.
"""

import typer

app = typer.Typer(
    name="mbmamba",
    help="Remove motion blur from photos with MBMamba.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Run the `mbmamba` command line."""
    from mbmamba_cli.cli import benchmark, deblur, evaluate, info, train  # noqa: F401  registers

    app()
