"""``python -m stepdiff``: the ``stepdiff`` command."""

from .cli import main

raise SystemExit(main())
