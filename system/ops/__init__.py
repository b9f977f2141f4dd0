"""Operating the service: the ``sessionlane`` command line and what it reads and reports.

``cli`` is the command line (``main``); ``running`` reads the per-user state files of running
services; ``overlap`` refuses a second service on the same roots; ``doctor`` diagnoses;
``logs`` places and rotates the log files; ``metrics`` serves Prometheus metrics. The config
loader, shared by every part, is ``sessionlane.system.config``.
"""
