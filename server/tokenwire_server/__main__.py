"""`python -m tokenwire_server` is `tokenwire serve`."""

import sys

from tokenwire_server.cli import main

sys.exit(main())
