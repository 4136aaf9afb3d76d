"""`python -m moeflow` runs the command line."""

from moeflow.cli import main

raise SystemExit(main())
