"""``distill report RUN``: the run report (``pipeline.views.report``) from the command line."""
from __future__ import annotations

from typing import Optional

import typer

from pipeline.cli.common import ConfigOpt, RootOpt, root_of


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(run: str = typer.Argument("latest", help="run id, 'latest', or a run manifest URI (local or s3://)"),
               root: Optional[str] = RootOpt, config: Optional[str] = ConfigOpt,
               out: Optional[str] = typer.Option(None, "--out", help="folder for report.html and figures/ (default: "
                                                 "runs/<id>/report beside a local run, ./distill-reports/<id> for s3)"),
               open_: bool = typer.Option(False, "--open", help="open the page in a browser")):
        """Write one self-contained HTML page for a run (summary, DAG, funnel, lengths, evaluation,
        performance, lineage) with its figures beside it, and print its path."""
        from pipeline.store.storage import StorageError
        from pipeline.views.report import ReportError, build

        try:
            page = build(run, root_of(root, config), out)
        except (ReportError, StorageError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1)
        typer.echo(f"report: {page}")
        if open_:
            import webbrowser

            if not webbrowser.open(page.as_uri()):
                typer.echo(f"could not start a browser; open {page.as_uri()}", err=True)
