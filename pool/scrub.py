"""Scrub: read every live record and every metadata block, verify every fragment and copy,
and repair what is wrong from redundancy (invariant 4).

The scrub is a persisted task (``PoolState.tasks["scrub"]``, journaled with the ``task``
op): its state (running | paused | canceled | finished), the last segment it finished,
and its counts. ``run`` works it off segment by segment in id order and commits its
position with the repairs, so after a restart it resumes where it was. Segments are pinned
while read (never freed under the scrub); no lock is held, so foreground I/O goes on; the
reads run in one thread at a time per pool and are throttled to a byte rate.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import trio

from pool import records
from pool.devio import write_within
from pool.errors import InvalidArgument
from pool.labels import label_copies, write_label
from pool.layout import SECTOR
from pool.lookup import locate, segment_records
from pool.pool import Pool
from pool.rebuild import _throttle, record_plans, steps

log = logging.getLogger(__name__)
COMMIT_EVERY = 2.0
MAX_REPORTED = 100   # unrecoverable records named in the task (the count is exact)


def task(pool: Pool) -> dict[str, Any] | None:
    value = pool.state.tasks.get("scrub")
    return dict(value) if value is not None else None


def last_completed(pool: Pool) -> dict[str, Any] | None:
    """The last scrub that ran to its end: {finished, found, repaired, unrecoverable}, or
    None. A new scrub carries it in its task's ``last`` until it finishes itself, so the
    metrics (and the 'scrub overdue' alert) keep the last result while one runs."""
    cur = task(pool)
    if cur is None:
        return None
    if cur["state"] == "finished":
        return {k: cur[k] for k in ("finished", "found", "repaired", "unrecoverable")}
    last = cur.get("last")
    return dict(last) if isinstance(last, dict) else None


def _total(pool: Pool) -> int:
    return sum(min(s.live, s.fill) * SECTOR * (s.k + s.m)
               for s in pool.state.segments.values())


async def control(pool: Pool, action: str) -> dict[str, Any]:
    """start | pause | resume | cancel; the new task state is committed on return."""
    cur = task(pool)
    state = cur["state"] if cur else None
    if action == "start":
        if state in ("running", "paused"):
            raise InvalidArgument(f"pool {pool.name}: a scrub is already {state} (use "
                                  f"--resume, --pause or --cancel)")
        cur = {"state": "running", "position": 0, "total": _total(pool), "done": 0,
               "found": 0, "repaired": 0, "unrecoverable": 0, "problems": [],
               "started": time.time(), "finished": None, "metadata": False,
               "last": last_completed(pool)}
    elif action in ("pause", "resume", "cancel"):
        want = {"pause": ("running",), "resume": ("paused",),
                "cancel": ("running", "paused")}[action]
        if cur is None or state not in want:
            raise InvalidArgument(f"pool {pool.name}: no scrub to {action} (scrub is "
                                  f"{state or 'not started'})")
        cur["state"] = {"pause": "paused", "resume": "running", "cancel": "canceled"}[action]
        if action == "cancel":
            cur["finished"] = time.time()
    else:
        raise InvalidArgument(f"unknown scrub action {action!r}")
    pool.catalog.set_task("scrub", cur)
    await pool.commit()
    log.info("pool %s: scrub %s", pool.name, cur["state"])
    return cur


async def scrub_metadata(pool: Pool) -> tuple[int, int, int]:
    """Verify every copy of every metadata blob and both labels of each present member;
    rewrite bad copies from a good one. Returns (checked, bad, repaired). On RADOS: the
    superblock, blobs, map nodes and journal objects (``RadosCommitMeta.scrub``)."""
    # Its thread work does not go through ``pool.maintenance``: a rebuild holds that for
    # its whole run, and waiting for it here while holding the commit lock (which the
    # rebuild's commits need) would deadlock. Metadata is small.
    txn = pool.txn
    if pool.rados is not None:       # objects: pool.rados.backend RadosCommitMeta.scrub
        async def rewrite() -> None:
            await txn.hooks.confirm_owner()
            await txn.checkpoint_locked()
        async with txn.lock:         # the checkpoint and journal stay as read
            return await pool.rados.commit.scrub(rewrite)
    checked = bad = repaired = 0
    locs = txn.meta_locations()
    for i in range(0, len(locs), 64):
        async with txn.lock:   # a checkpoint may reuse units: not meanwhile
            current = set(txn.meta_locations())
            chunk = [loc for loc in locs[i:i + 64] if loc in current]
            c, b, r, failed = await trio.to_thread.run_sync(pool.meta.repair_blobs, chunk)
        checked, bad, repaired = checked + c, bad + b, repaired + r
        for idx in failed:
            pool.count_error(idx, "checksum", "metadata copy")
    for mi in pool.state.members:
        dev = pool.devices[mi.index]
        if dev is None:
            continue
        copies = await trio.to_thread.run_sync(label_copies, dev, pool.deadlines, mi.size)
        checked += 2
        wrong = [w for w, lab in copies if isinstance(lab, str) or lab.device_uuid != mi.uuid]
        if wrong:
            bad += len(wrong)
            async with txn.lock:
                await write_within([(dev, partial(write_label, dev, pool.label(mi)))],
                                   "repairing a label", pool.deadlines)
            repaired += len(wrong)
            txn.dirty.add(mi.index)
    return checked, bad, repaired


def _running(pool: Pool) -> bool:
    cur = pool.state.tasks.get("scrub")
    return cur is not None and cur.get("state") == "running"


async def run(pool: Pool, *, rate: float | None = None) -> dict[str, Any] | None:
    """Work the persisted scrub until it is finished, paused or canceled; returns the task.
    ``rate``: at most this many bytes per second read."""
    cur = task(pool)
    if cur is None or cur["state"] != "running":
        return cur
    started = time.monotonic()
    done_at_start = cur["done"]
    last_commit = time.monotonic()
    budget_start, budget_bytes = started, 0
    try:
        if not cur.get("metadata"):
            checked, bad, fixed = await scrub_metadata(pool)
            cur["found"] += bad
            cur["repaired"] += fixed
            cur["metadata"] = True
            if bad > fixed:
                cur["unrecoverable"] += bad - fixed
                cur["problems"].append(f"{bad - fixed} metadata copies could not be rewritten")
            log.info("pool %s: scrub checked %d metadata copies, %d bad, %d rewritten",
                     pool.name, checked, bad, fixed)
            if not _running(pool):
                return task(pool)
            pool.catalog.set_task("scrub", cur)
        for seg_id in sorted(s for s in pool.state.segments if s > cur["position"]):
            if not _running(pool):
                return task(pool)
            seg = pool.state.segments.get(seg_id)
            if seg is None:
                continue
            entries = segment_records(pool.state, seg_id)
            pool.pins.pin(seg_id)
            try:
                for batch, size in steps(entries, seg.k):
                    plans = record_plans(seg, batch, pool.store.columns(seg))
                    out = await trio.to_thread.run_sync(
                        records.verify_stripes, plans, pool.deadlines,
                        limiter=pool.maintenance)
                    n_fixed = await pool.reader.repair(out.repairs, out.device_errors,
                                                       foreground=False)
                    cur["found"] += out.bad
                    cur["repaired"] += n_fixed
                    pool.counters["repaired_fragments"] += n_fixed
                    for slot, why in out.failures.items():
                        cur["unrecoverable"] += 1
                        where = ", ".join(locate(pool.state, batch[slot])) or "no map"
                        msg = f"{where}: {why}"
                        log.error("pool %s: scrub: unrecoverable record: %s", pool.name, msg)
                        if len(cur["problems"]) < MAX_REPORTED:
                            cur["problems"].append(msg)
                    cur["done"] += size * (seg.k + seg.m)
                    pool.counters["scrubbed_bytes"] += out.bytes_read
                    budget_bytes += out.bytes_read
                    pool.activity["scrub"] = _rates(cur, done_at_start, started)
                    budget_start, budget_bytes = await _throttle(rate, budget_start,
                                                                 budget_bytes)
            finally:
                pool.pins.unpin(seg_id)
            if not _running(pool):    # paused or canceled meanwhile: theirs wins
                return task(pool)
            cur["position"] = seg_id
            pool.catalog.set_task("scrub", cur)   # in memory now (pause keeps it), durable soon
            if time.monotonic() - last_commit > COMMIT_EVERY:
                await pool.commit()
                last_commit = time.monotonic()
        if _running(pool):
            cur["state"] = "finished"
            cur["finished"] = time.time()
            cur["done"] = max(cur["done"], cur["total"])
            pool.catalog.set_task("scrub", cur)
            await pool.commit()
            log.info("pool %s: scrub finished: %d bad fragment(s) found, %d repaired, %d "
                     "unrecoverable", pool.name, cur["found"], cur["repaired"],
                     cur["unrecoverable"])
        return task(pool)
    finally:
        pool.activity.pop("scrub", None)





def _rates(cur: dict[str, Any], done0: int, started: float) -> dict[str, float | None]:
    elapsed = max(1e-6, time.monotonic() - started)
    rate = (cur["done"] - done0) / elapsed
    left = max(0, cur["total"] - cur["done"])
    return {"rate": rate, "eta": left / rate if rate > 0 else None}


def status(pool: Pool) -> dict[str, Any] | None:
    """The scrub task as the control API shows it (with the live rate and ETA)."""
    cur = task(pool)
    if cur is None:
        return None
    live = pool.activity.get("scrub") or {}
    cur["rate"] = live.get("rate", 0.0) if cur["state"] == "running" else 0.0
    cur["eta"] = live.get("eta") if cur["state"] == "running" else None
    return cur


async def wait(pool: Pool, poll: float = 0.2) -> dict[str, Any] | None:
    # The task state lives in the pool's metadata (changed by ops): polled, not signalled.
    while _running(pool):  # noqa: ASYNC110
        await trio.sleep(poll)
    return task(pool)
