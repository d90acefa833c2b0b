"""`python -m tokenwire_server` is `tokenwire serve`."""

import os
import sys

# grpc's C core writes plain-text lines (a failed TLS handshake, one per bad
# client) into the server's JSON log; it reads this once, when grpc is first
# imported, which the import below does. GRPC_VERBOSITY set by the operator wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from tokenwire_server.cli import main  # after the setting above

sys.exit(main())
