"""An actor that watched fds and closes them on exit still gets its last messages out.

thespian keeps an actor's last ``ThespianWatch`` list through the drain after
``ActorExitRequest`` (it skips ``set_watch`` for that message). A handler that closes its
watched sockets on exit frees their numbers; the transport's next socket takes one of them,
and the drain registers that number twice: ``KeyError: 'N (FD N) is already registered'``, a
traceback, and what the actor sent on its way out was lost (seen at the end of a bench scale
step, from the gateway). ``ShellActor`` clears the list after every exit handler.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from thespian.actors import Actor, ActorExitRequest, ThespianWatch

from sessionlane.actors._shell import Handler, ShellActor
from sessionlane.system.runtime.launch import start_tcp_system


class Relay(Actor):  # type: ignore[misc]
    """Forwards everything after the first message to whoever sent that one."""

    def receiveMessage(self, message: Any, sender: Any) -> None:
        if message == "hello":
            self.home = sender
            self.send(sender, "ready")
        elif hasattr(self, "home"):
            self.send(self.home, message)


class Watcher(ShellActor):
    """Watches a socketpair; on exit closes it and says goodbye to a peer it never sent to."""

    def handlers(self) -> dict[type, Handler]:
        return {tuple: self.on_start, ActorExitRequest: self.on_exit}

    def receiveMessage(self, msg: Any, sender: Any) -> ThespianWatch | None:
        super().receiveMessage(msg, sender)
        if isinstance(msg, ActorExitRequest) or not hasattr(self, "pair"):
            return None
        return ThespianWatch([s.fileno() for s in self.pair])

    def on_start(self, msg: tuple[str, Any], sender: Any) -> None:
        self.peer = msg[1]
        self.pair = socket.socketpair()
        self.send(sender, "watching")

    def on_exit(self, msg: ActorExitRequest, sender: Any) -> None:
        for sock in self.pair:
            sock.close()  # the lowest free numbers now: the transport's next socket reuses one
        self.send(self.peer, "goodbye")


@pytest.mark.tcp
def test_an_actor_that_closes_its_watched_sockets_on_exit_still_sends_its_last_message(
    tmp_path: Path,
) -> None:
    system = start_tcp_system(log_file=tmp_path / "actors.log")
    try:
        asys = system.asys
        relay = asys.createActor(Relay)
        assert asys.ask(relay, "hello", 10) == "ready"
        watcher = asys.createActor(Watcher)
        assert asys.ask(watcher, ("start", relay), 10) == "watching"
        asys.tell(watcher, ActorExitRequest())
        assert asys.listen(10) == "goodbye"
        thespian_log = tmp_path / "actors.thespian.log"
        text = thespian_log.read_text() if thespian_log.exists() else ""
        assert "already registered" not in text, text
    finally:
        system.stop()
