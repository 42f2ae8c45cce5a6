"""The ``distill`` command line: ``main`` builds one Typer app; each command group has its module."""
