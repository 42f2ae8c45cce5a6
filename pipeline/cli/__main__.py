"""``python -m pipeline.cli``: the ``distill`` command."""
from pipeline.cli.main import main

main()
