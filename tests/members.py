"""Which processes of a test's actor system are file actors, told apart by their titles.

A test that means "no file actor was started" or "the refused actors retired" counts these,
never the size of the system's process group: besides the actors, the group holds the zygote,
the child it keeps forked ahead for the next file, and, while it forks that child, a
short-lived first child, so the group's size changes whenever a file actor starts.
"""

from __future__ import annotations

from sessionlane.actors import procfs
from sessionlane.actors._shell import TITLE_PREFIX
from sessionlane.system.runtime.launch import TcpSystem

__all__ = ["file_processes"]

# A file actor's process as thespian titles it when it starts it (setproctitle installed),
# then as the actor titles itself once it knows its path.
_FILE_TITLES = ("SessionFile ActorAddr", TITLE_PREFIX + "file ")


def file_processes(system: TcpSystem) -> list[int]:
    """The system's live processes that are a file's actor (titled ``sessionlane: file PATH``,
    or still thespian's ``SessionFile ActorAddr-...`` before it has its path). Not the zygote,
    the child it parks ahead or the short-lived child it forks that one through."""
    return [p for p in system.members() if procfs.command_line(p).startswith(_FILE_TITLES)]
