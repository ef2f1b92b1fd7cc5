"""`python -m facescale` is the `facescale` command."""

import sys

from facescale.cli import main

sys.exit(main())
