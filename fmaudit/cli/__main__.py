"""`python -m fmaudit.cli`: the same as the `fmaudit` command."""

from fmaudit.cli import main

main()
