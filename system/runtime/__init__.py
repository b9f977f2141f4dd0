"""The runtime: starting, patching and supervising the thespian actor system.

``service`` is the in-process service (``Service``, ``embedded_service``): actor system,
Registry, Gateway and convention membership; ``launch`` starts and stops a
``multiprocTCPBase`` system; ``loopback``, ``poll_loop``, ``transport_auth`` (with
``connection_auth``: the hello and the limits before it) and ``admin_fork`` patch thespian (each
refuses another thespian version); ``lifeline`` and ``_watchdog`` (exec'd
by path) kill a system whose starter died; ``limits`` fits ``max_files`` to the descriptor limit.
"""
