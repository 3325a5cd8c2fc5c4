"""Which backups to delete: a pure function of the list, the policy and the clock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sidecar.repository import Entry, newest_good


@dataclass(frozen=True)
class Decision:
    entry: Entry
    action: str  # keep | delete | report
    reason: str


def classify(entries: list[Entry], retention_days: int, now: datetime) -> list[Decision]:
    """Keep everything younger than the retention period, the newest good backup, pinned backups and
    anything we cannot read; delete the rest. retention_days == 0 keeps everything."""
    ordered = sorted(entries, key=lambda e: e.id, reverse=True)
    newest = newest_good(ordered, now)
    newest_id = newest.id if newest else None
    cutoff = now - timedelta(days=retention_days)
    decisions = []
    for entry in ordered:
        if entry.metadata is None:
            decisions.append(Decision(entry, "report", f"{entry.status}: {entry.problem}; not deleted, check it by hand"))
        elif entry.id == newest_id:
            decisions.append(Decision(entry, "keep", "newest good backup"))
        elif entry.metadata.get("keep"):
            decisions.append(Decision(entry, "keep", "pinned (unpin to release)"))
        elif retention_days == 0:
            decisions.append(Decision(entry, "keep", "retention disabled"))
        elif entry.timestamp >= cutoff:
            decisions.append(Decision(entry, "keep", f"younger than {retention_days} days"))
        else:
            decisions.append(Decision(entry, "delete", f"older than {retention_days} days"))
    return decisions
