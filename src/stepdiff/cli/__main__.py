"""``python -m stepdiff.cli``: the ``stepdiff`` command."""

from . import main

raise SystemExit(main())
