"""The distribution's version: the one place it is written.

pyproject reads it (``[tool.setuptools.dynamic]``), ``sessionlane.__version__`` re-exports it
and ``sessionlane --version`` prints it. It lives here, not in ``sessionlane``, so the CLI can
read it without importing the client facade (a lower layer never imports a higher one).
"""

__version__ = "0.1.0"
