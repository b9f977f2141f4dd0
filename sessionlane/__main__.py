"""``python -m sessionlane``: the ``sessionlane`` command."""

from __future__ import annotations

import sys

from sessionlane.system.ops.cli import main

if __name__ == "__main__":
    sys.exit(main())
