"""What every ``distill`` command shares: the consoles, loading a config (its errors printed one
way, redacted), and the storage root a command works on (``--root``, else ``--config``'s
``storage.root``, else ``$DISTILL_ROOT``, else ``.distill``: ``pipeline.store.layout.default_root``)."""
from __future__ import annotations

from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.core.config import ConfigError, PipelineConfig, load_config
from pipeline.store.layout import default_root
from pipeline.store.secrets import redact
from pipeline.store.storage import Storage

console = Console(stderr=True)
out = Console()

SetOpt = typer.Option(None, "--set", help="override a config value: a.b.c=value (repeatable)")
RootOpt = typer.Option(None, "--root", help="storage root (default: $DISTILL_ROOT, else .distill)")
ConfigOpt = typer.Option(None, "--config", help="take the storage root from this pipeline config")


def fail(problem: Exception | str, code: int = 1, label: str = "error") -> NoReturn:
    """Print ``problem`` on stderr, a line each, with any secret of this environment redacted,
    and exit with ``code``: how every command reports what stops it."""
    for line in str(problem).splitlines() or [""]:
        console.print(f"[bold red]{label}[/] {escape(redact(line))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load(config: str, overrides: list[str] | None = None) -> PipelineConfig:
    """The config, or exit 2 after printing each problem (file and field) as a config error."""
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        fail("\n".join(e.problems), 2, "config error")


def root_of(root: Optional[str] = None, config: Optional[str] = None) -> str:
    """The storage root a command works on: ``--root``, else the config's, else the default."""
    if root:
        return root
    if config:
        return load(config).storage.root
    return default_root()


def storage(root: Optional[str] = None, config: Optional[str] = None) -> Storage:
    return Storage(root_of(root, config))
