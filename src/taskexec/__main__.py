"""``python -m taskexec``: the command line."""

from .cli import main

raise SystemExit(main())
