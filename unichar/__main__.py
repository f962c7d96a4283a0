"""``python -m unichar``: the same as the ``unichar`` command."""

from unichar.cli import main

raise SystemExit(main())
