"""`mbmamba info`: versions, devices, scan backends and shipped weights."""

import json

import typer

from mbmamba_cli.cli import app


@app.command("info")
def info(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Print versions, devices, available scan backends, variants and shipped weights."""
    from mbmamba_cli.inspection import collect_info, render_info

    report = collect_info()
    if as_json:
        typer.echo(json.dumps(report))
        return
    render_info(report)
