"""When a SessionFile asks the Registry to retire it. Pure: times are inputs.

The Registry retires a SessionFile only when the number of messages it forwarded equals the
number the file says it received, so no message can be in flight to an actor that exits.
``Passivation`` keeps the file's side of that count and of its idleness:

* ``received``: messages the Registry forwarded (calls, channel requests, status queries);
  channel calls are not counted (the Registry never saw them), they only count as activity;
* one idle timer at a time, due ``idle_ms`` after the last activity; when it fires on a file
  with nothing happening since, nothing held or queued and no channel, the file asks to be
  retired (``IdleNotice``) and is *retiring*: it accepts no new channel until a message from
  the Registry shows it was not retired after all (the Registry counted more);
* a broken file (failed activation) asks to be retired once per count of messages answered.
"""

from __future__ import annotations

__all__ = ["Passivation"]


class Passivation:
    """One SessionFile's count of forwarded messages, its activity and its idle timer."""

    def __init__(self) -> None:
        self.received = 0  # messages the Registry forwarded
        self.reported = -1  # ``received`` when the broken state was last reported
        self.activity = 0  # calls of any route
        self.last_active = 0.0
        self.armed = False  # an IdleCheck is pending
        self.retiring = False  # IdleNotice sent; cleared by the next message from the Registry

    def forwarded(self, now: float, *, activity: bool = True) -> bool:
        """The Registry forwarded a message; True: a retirement was cancelled (re-arm).

        ``activity=False`` (a status query): it does not keep the file from going idle, or a
        metrics scraper polling every few seconds would keep every file alive forever.
        """
        self.received += 1
        if activity:
            self.touch(now)
        if not self.retiring:
            return False
        # The Registry now counts more than our IdleNotice said: it will not retire us.
        self.retiring = False
        return True

    def touch(self, now: float) -> None:
        """A call came (from the Registry or a channel)."""
        self.activity += 1
        self.last_active = now

    def arm(self, now: float, idle_ms: float) -> float | None:
        """Milliseconds until the idle timer is due, if it must be armed now (else None).

        It stays armed for the actor's life (re-armed each time it fires) except while
        retiring; a timer per call would pile up in thespian's sorted wakeup list.
        """
        if self.armed or self.retiring:
            return None
        self.armed = True
        due = self.last_active + idle_ms
        if due <= now:
            due = now + idle_ms  # nothing happened since, but it was not quiet: look again later
        return due - now

    def fired(self, seen: int, *, quiet: bool) -> bool | None:
        """The idle timer armed at activity ``seen`` fired, the file being ``quiet`` or not.

        True: ask to be retired now (the file is retiring); False: re-arm; None: nothing
        (already retiring).
        """
        self.armed = False
        if self.retiring:
            return None
        if seen == self.activity and quiet:
            self.retiring = True
            return True
        return False

    def report_broken(self) -> bool:
        """Should a broken file report itself now? Once per count of messages answered."""
        if self.reported == self.received:
            return False
        self.reported = self.received
        return True
