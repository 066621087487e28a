"""`python -m flash_kda ...` runs the `flash-kda` command."""

from .cli import main

raise SystemExit(main())
