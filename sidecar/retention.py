"""Which backups to delete: a pure function of the list, the policy and the clock.

Each rule names the backups it keeps; a backup is deleted only when no rule keeps it (the union of the
rules). Whatever the rules say, the newest good backup, the newest one whose restore drill passed, pinned
backups and anything we cannot read are kept."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sidecar.repository import Entry, newest_drill_passed, newest_good


@dataclass(frozen=True)
class Decision:
    entry: Entry
    action: str  # keep | delete | report
    reason: str


@dataclass(frozen=True)
class Policy:
    """days: keep everything younger; last: the N newest good backups; daily/weekly/monthly: the newest good
    backup of each of the N most recent days / ISO weeks / months that have one, in `timezone`. 0 turns a
    rule off; with every rule off, retention keeps everything."""

    days: int = 30
    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    timezone: str = "UTC"

    @property
    def enabled(self) -> bool:
        return any((self.days, self.last, self.daily, self.weekly, self.monthly))

    def describe(self) -> str:
        parts = [f"{self.days} days"] if self.days else []
        parts += [f"last {self.last}"] if self.last else []
        parts += [f"{n} {tier}" for n, tier in ((self.daily, "daily"), (self.weekly, "weekly"), (self.monthly, "monthly")) if n]
        return ", ".join(parts) or "keep everything"


TIERS: dict[str, Callable[[datetime], str]] = {
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2]),
    "monthly": lambda t: t.strftime("%Y-%m"),
}


def representatives(entries: list[Entry], count: int, tier: str, timezone: str) -> dict[str, str]:
    """{backup id: period} for the newest good backup of each of the `count` most recent periods (days, ISO
    weeks, months in `timezone`) that have a good backup. Within a period, one whose drill failed is chosen
    only if every backup of that period failed its drill. Periods without a backup do not count, so a
    week without backups does not thin out the history (borg's and restic's rule)."""
    zone = ZoneInfo(timezone)
    periods: dict[str, list[Entry]] = {}
    for entry in sorted((e for e in entries if e.good), key=lambda e: e.id, reverse=True):
        periods.setdefault(TIERS[tier](entry.timestamp.astimezone(zone)), []).append(entry)
    chosen = {}
    for period in sorted(periods, reverse=True)[:count]:
        candidates = periods[period]
        pick = next((e for e in candidates if e.drill != "failed"), candidates[0])
        chosen[pick.id] = period
    return chosen


def classify(entries: list[Entry], policy: Policy | int, now: datetime) -> list[Decision]:
    """Keep what any rule of `policy` keeps (an int is a days-only policy), the newest good backup, the
    newest backup whose drill passed, pinned backups and anything we cannot read; delete the rest."""
    if isinstance(policy, int):
        policy = Policy(days=policy)
    ordered = sorted(entries, key=lambda e: e.id, reverse=True)
    protected = {}
    passed = newest_drill_passed(ordered, now)
    if passed:
        protected[passed.id] = "newest backup whose restore drill passed"
    newest = newest_good(ordered, now)
    if newest:
        protected[newest.id] = "newest good backup"  # if both, the shorter reason says enough
    last = {e.id for e in [e for e in ordered if e.good][:policy.last]}
    tiers = {tier: representatives(ordered, count, tier, policy.timezone)
             for tier, count in (("daily", policy.daily), ("weekly", policy.weekly), ("monthly", policy.monthly)) if count}
    cutoff = now - timedelta(days=policy.days)
    decisions = []
    for entry in ordered:
        if entry.metadata is None:
            decisions.append(Decision(entry, "report", f"{entry.status}: {entry.problem}; not deleted, check it by hand"))
            continue
        reasons = [protected[entry.id]] if entry.id in protected else []
        if entry.metadata.get("keep"):
            reasons.append("pinned (unpin to release)")
        if not policy.enabled:
            reasons.append("retention disabled")
        if entry.id in last:
            reasons.append(f"one of the last {policy.last} good backups")
        reasons += [f"{tier} ({chosen[entry.id]})" for tier, chosen in tiers.items() if entry.id in chosen]
        if policy.days and entry.timestamp >= cutoff:
            reasons.append(f"younger than {policy.days} days")
        if reasons:
            decisions.append(Decision(entry, "keep", "; ".join(reasons)))
        else:
            decisions.append(Decision(entry, "delete", _why_deleted(entry, policy)))
    return decisions


def _why_deleted(entry: Entry, policy: Policy) -> str:
    parts = [f"older than {policy.days} days"] if policy.days else []
    if policy.last:
        parts.append(f"not one of the last {policy.last} good backups" if entry.good else f"not good ({entry.status})")
    parts += [f"not the {tier} backup kept for its period" for tier, n in (("daily", policy.daily), ("weekly", policy.weekly),
                                                                              ("monthly", policy.monthly)) if n]
    return ", ".join(parts)


# --- base backups and the WAL they need (point-in-time recovery) ------------------------------------
#
# pgBackRest's rule (repo-retention-full + archive expiry): base backups are kept by age, never the newest good one,
# never a pinned one; the WAL archive then keeps, per system, every segment from the start of the oldest base backup
# kept. Recovery from a base backup reads segments from its start segment on (on its timeline and the ones after), so a
# segment numbered below the start of every kept base backup of its system is read by nothing kept, on any timeline.


@dataclass(frozen=True)
class BaseFacts:
    """What retention needs to know of one base backup (pure data; read by sidecar.physical.base)."""

    id: str
    status: str  # ok | waiting-for-wal | missing-file | size-mismatch | unreadable-metadata | broken-chain (an incremental missing a link)
    finished: datetime | None = None
    system_id: str = ""
    start_segno: int = 0
    keep: bool = False
    parent: str = ""  # an incremental base backup: the one it builds on (restoring it needs the whole chain)

    @property
    def good(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class BaseDecision:
    id: str
    action: str  # keep | delete | report
    reason: str


def classify_base(backups: list[BaseFacts], days: int, now: datetime, hold: dict[str, str] | None = None) -> list[BaseDecision]:
    """Keep base backups younger than `days` (0: keep all), the newest good one (a base backup `waiting-for-wal` is not
    good), any newer than it (they may still become good), pinned ones, and those `hold` names (id -> why: not off-site
    yet); report unreadable ones; delete the rest. Newest first."""
    ordered = sorted(backups, key=lambda b: b.id, reverse=True)
    newest_good = next((b for b in ordered if b.good and b.finished is not None and b.finished <= now), None)
    cutoff = now - timedelta(days=days)
    # the newest good one that finished before the window (of the newest good one's system): with its WAL, every moment
    # of the window stays recoverable, not only those after the oldest base backup younger than `days` (pgBackRest's rule)
    reaching = next((b for b in ordered if b.good and b.finished is not None and b.finished <= cutoff
                     and newest_good is not None and b.system_id == newest_good.system_id), None) if days else None
    decisions = []
    for backup in ordered:
        if backup.status == "unreadable-metadata" or backup.finished is None:
            decisions.append(BaseDecision(backup.id, "report", f"{backup.status}: not deleted, check it by hand"))
            continue
        reasons = []
        if newest_good is not None and backup.id == newest_good.id:
            reasons.append("newest good base backup")
        elif newest_good is None or backup.id > newest_good.id:
            reasons.append(f"newer than the newest good base backup ({backup.status})" if newest_good else "no good base backup yet")
        if reaching is not None and backup.id == reaching.id and backup.id != (newest_good.id if newest_good else None):
            reasons.append(f"newest good base backup from before the {days}-day window (its WAL reaches every moment of it)")
        if backup.keep:
            reasons.append("pinned (unpin to release)")
        if hold and backup.id in hold:
            reasons.append(hold[backup.id])
        if not days:
            reasons.append("retention disabled")
        elif backup.finished >= cutoff:
            reasons.append(f"younger than {days} days")
        if reasons:
            decisions.append(BaseDecision(backup.id, "keep", "; ".join(reasons)))
        else:
            decisions.append(BaseDecision(backup.id, "delete", f"older than {days} days" + ("" if backup.good else f", {backup.status}")))
    return _keep_chains(ordered, decisions)


def _keep_chains(ordered: list[BaseFacts], decisions: list[BaseDecision]) -> list[BaseDecision]:
    """An incremental base backup kept keeps every one it builds on, down to its full one: a chain is kept whole."""
    by_id = {b.id: b for b in ordered}
    action = {d.id: d for d in decisions}
    for backup in ordered:  # newest first: a kept incremental marks its parents before they are reached
        if action[backup.id].action != "keep":
            continue
        child, parent_id = backup, backup.parent
        while parent_id and parent_id in action:
            if action[parent_id].action == "delete":
                action[parent_id] = BaseDecision(parent_id, "keep", f"incremental {child.id} builds on it (a chain is kept whole)")
            elif action[parent_id].action == "report":
                break
            child = by_id[parent_id]
            parent_id = child.parent
    return [action[d.id] for d in decisions]


def wal_cutoffs(backups: list[BaseFacts], decisions: list[BaseDecision]) -> dict[str, int | None]:
    """{system identifier: the start segment number of its oldest kept base backup}; None for a system whose base
    backups all go (nothing kept can replay its WAL: it all goes). A system without any base backup (WAL streamed
    before the first base backup) gets no entry: its WAL is kept."""
    kept = {d.id for d in decisions if d.action != "delete"}
    cutoffs: dict[str, int | None] = {}
    for backup in backups:
        if not backup.system_id:
            continue
        cutoffs.setdefault(backup.system_id, None)
        if backup.id in kept:
            current = cutoffs[backup.system_id]
            cutoffs[backup.system_id] = backup.start_segno if current is None else min(current, backup.start_segno)
    return cutoffs


def wal_to_delete(segments: dict[tuple[str, int], list[int]], cutoffs: dict[str, int | None]) -> dict[tuple[str, int], list[int]]:
    """{(system, timeline): segment numbers to delete}: those below their system's cutoff (all of a system whose cutoff
    is None). History files are never segments here: they stay."""
    doomed: dict[tuple[str, int], list[int]] = {}
    for (system, timeline), segnos in segments.items():
        if system not in cutoffs:
            continue
        cutoff = cutoffs[system]
        below = [s for s in segnos if cutoff is None or s < cutoff]
        if below:
            doomed[(system, timeline)] = below
    return doomed


def copied_only(doomed: dict[tuple[str, int], list[int]], marks: dict[tuple[str, int], int]) -> dict[tuple[str, int], list[int]]:
    """Of the segments retention lets go, those already off-site (numbered up to the newest copied of their system and
    timeline, `marks`): with a remote store, WAL never leaves the volume before it has a copy."""
    kept = {key: [s for s in segnos if s <= marks.get(key, -1)] for key, segnos in doomed.items()}
    return {key: segnos for key, segnos in kept.items() if segnos}
