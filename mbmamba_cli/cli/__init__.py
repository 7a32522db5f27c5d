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


def _print_version(value: bool) -> None:
    if value:
        from mbmamba_cli import __version__

        typer.echo(f"mbmamba {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Remove motion blur from photos with MBMamba."""


def main() -> None:
    """Run the `mbmamba` command line."""
    from mbmamba_cli.cli import benchmark, deblur, evaluate, info, train  # noqa: F401  registers

    app()
