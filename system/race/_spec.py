"""The lane process specification: what the runner hands each ``sessionlane.system.race.lane``
process.

Kept apart from ``sessionlane.system.race.lane`` so that importing the package never imports the
module that ``python -m`` is about to run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from sessionlane.system.race._lockfile import LockPolicy
from sessionlane.system.race.workload import LANE_KINDS, LaneKind, Plan, WorkloadParams, make_plan

__all__ = ["LaneSpec", "params_from_dict", "params_to_dict"]


@dataclass(frozen=True)
class LaneSpec:
    """Everything a lane process needs; written by the runner as JSON."""

    lane: LaneKind
    backend: dict[str, Any]
    seed: int
    sessions: int
    duration_s: float
    speed: float
    workdir: str
    """Holds ``sessions/``, ``logs/`` and ``activity/`` of one system's run."""
    params: dict[str, Any] | None = None
    """``WorkloadParams`` as a dict (None: defaults)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LaneSpec:
        data = json.loads(text)
        if data.get("lane") not in LANE_KINDS:
            raise ValueError(f"unknown lane {data.get('lane')!r}")
        return cls(**data)

    def plan(self) -> Plan:
        return make_plan(
            self.seed, self.sessions, self.duration_s, self.speed, params_from_dict(self.params)
        )


def params_to_dict(params: WorkloadParams) -> dict[str, Any]:
    return asdict(params)


def params_from_dict(data: dict[str, Any] | None) -> WorkloadParams | None:
    if data is None:
        return None
    values = dict(data)
    values["lock_policy"] = LockPolicy(**values["lock_policy"])
    return WorkloadParams(**values)
