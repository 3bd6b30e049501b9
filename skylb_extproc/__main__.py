"""`python -m skylb_extproc ...` runs the CLI."""

from skylb_extproc.cli import main

raise SystemExit(main())
