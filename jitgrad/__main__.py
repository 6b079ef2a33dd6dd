"""`python -m jitgrad ...` runs the `jitgrad` command (e.g. under mpiexec without the script)."""

import sys

from .tools.cli import main

sys.exit(main())
