"""The gateway: client sockets in, SessionFiles out.

``gateway`` is the Gateway actor (connections, hello, lanes hosted in it); ``links`` its direct
per-file channels to the SessionFiles; ``admission`` who may connect (tokens, the hello budget,
connection limits); ``peercred`` the Unix peer's uid.
"""
