"""Who runs a job: the next job to run, claims with leases, progress that renews them, and
micro-batch membership.

A broker message is a turn to run, not an order to run one job: the worker that takes it runs the job
the fair queue puts first (`next_job`), or a job whose worker vanished (its lease lapsed), or nothing.
Every job made one message, and a claim uses one, so the turns always cover the jobs that wait. A
worker claims a job with the same atomic script whether it leads a pipeline call or joins one as a
micro-batch mate, so two workers can never both run a job. The lease is renewed at every denoising
step and by the worker's heartbeat; a job whose lease ran out may be claimed again, until it has used
up its attempts.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

import redis

from shared import keys
from shared.db import NotReplicated, acked
from shared.errors import Code
from shared.jobs import scripts
from shared.jobs.record import JobRecord
from shared.queue import lane_queue


@dataclass(frozen=True)
class Claim:
    """The outcome of a claim. `outcome`: claimed (then `rec` is the fresh record), owned (leased
    elsewhere for `value` more seconds), exhausted (it ran out of attempts and has just failed),
    terminal or missing."""

    outcome: str
    value: float = 0.0
    rec: JobRecord | None = None


class Leases:
    def __init__(self, r: redis.Redis, ttl_s: int, max_attempts: int, lane: str = ""):
        # `lane`: a worker's model's (shared.catalog): it takes, rescues and gives turns to that lane's jobs only
        self.r, self.ttl_s, self.max_attempts, self.lane = r, ttl_s, max_attempts, lane
        self._claim = r.register_script(scripts.CLAIM)
        self._next = r.register_script(scripts.NEXT)
        self._progress = r.register_script(scripts.PROGRESS)
        self._drop = r.register_script(scripts.DROP_LEASE)
        self._missing_turns = r.register_script(scripts.MISSING_TURNS)

    def next_job(self) -> str | None:
        """The job a free worker should claim: a lapsed lease first, else the fair queue's first
        interactive job, else its first bulk job."""
        found = self._next(
            keys=[keys.running(self.lane), keys.ready("interactive", self.lane), keys.ready("bulk", self.lane)],
            args=[repr(time.time())],
        )
        return str(found) if found else None

    def claim(self, rec: JobRecord, owner: str, lease_s: float, unconfirmed: bool = False) -> Claim:
        """Take a job to run (its record as last read: only its immutable keys are used). `unconfirmed`:
        a claim that no replica confirmed in time stands all the same (a micro-batch mate: if a
        failover loses the claim, the job runs again, as after any lost worker); else `NotReplicated`."""
        now = time.time()
        err = json.dumps(
            {"code": Code.worker_lost, "message": f"the job's worker died {self.max_attempts} times running it"}
        )
        args = [rec.id, keys.events(rec.id), owner, repr(now), repr(now + lease_s), self.max_attempts, self.ttl_s, err]
        try:
            answer = acked(self.r, self._claim, rec.keys, args)
        except NotReplicated as exc:
            if not unconfirmed or exc.answer is None:
                raise
            answer = exc.answer
        res, val, *flat = answer
        fresh = JobRecord(dict(zip(flat[::2], flat[1::2], strict=True))) if flat else None
        try:
            num = float(val)
        except ValueError:
            num = 0.0
        return Claim(res, num, fresh)

    def report(self, job_id: str, owner: str, lease_s: float, step: int | None = None, total: int | None = None) -> int:
        """Renew the lease (and record progress); 1 if a cancel was asked, -1 if the job is no longer ours."""
        return self.report_many([(job_id, owner)], lease_s, step, total)[0]

    def report_many(
        self, running: list[tuple[str, str]], lease_s: float | None, step: int | None = None, total: int | None = None
    ) -> list[int]:
        """`report` for every (job id, owner) of a micro-batch in one command. `lease_s` None: the leases
        stay as they are (the heartbeat renews them), only cancels are asked for."""
        if not running:
            return []
        until = "" if lease_s is None else repr(time.time() + lease_s)
        args: list[str | int] = [until, "" if step is None else step, total or 0]
        for job_id, owner in running:
            args += [job_id, keys.events(job_id), owner]
        flags = self._progress(keys=[keys.running(self.lane), *(keys.job(j) for j, _ in running)], args=args)
        return [int(x) for x in flags]

    def take_compatible(
        self,
        compat_key: str,
        priorities: tuple[str, ...],
        max_rows: int,
        owner_prefix: str,
        lease_s: float,
        scan: int = 64,
    ) -> tuple[list[tuple[JobRecord, str]], list[JobRecord]]:
        """Claim the oldest waiting jobs of `compat_key` in these priority classes (in this order),
        together at most `max_rows` rows.

        Returns (claimed (record, owner) pairs, records that ran out of attempts and failed instead).
        The claimed jobs' own messages later find other work, or none.
        """
        ids: list[tuple[str, str]] = []
        for priority in priorities:
            found: list[str] = self.r.zrange(keys.compatible_waiting(compat_key, priority, self.lane), 0, scan - 1)  # type: ignore[assignment]
            ids += [(jid, priority) for jid in found]
        if not ids:
            return [], []
        pipe = self.r.pipeline(transaction=False)
        for jid, _ in ids:
            pipe.hmget(keys.job(jid), ["tenant", "batch", "rows", "solo"])
        claimed: list[tuple[JobRecord, str]] = []
        exhausted: list[JobRecord] = []
        left = max_rows
        for (jid, priority), (tenant, batch, rows, solo) in zip(ids, pipe.execute(), strict=True):
            n = int(rows or 1)
            if tenant is None or n > left or solo == "1":
                continue
            owner = f"{owner_prefix}/{secrets.token_hex(4)}"
            fields = {"id": jid, "tenant": tenant, "bkey": compat_key, "batch": batch or "", "priority": priority}
            stub = JobRecord({**fields, "lane": self.lane})
            got = self.claim(stub, owner, lease_s, unconfirmed=True)
            if got.outcome == "claimed" and got.rec is not None:
                claimed.append((got.rec, owner))
                left -= n
            elif got.outcome == "exhausted":
                exhausted.append(stub)
            if left <= 0:
                break
        return claimed, exhausted

    # Micro-batches: who shares the leader's pipeline call.
    def lapsed(self, every_s: float, limit: int = 20) -> list[str]:
        """Jobs whose lease lapsed, each returned once per `every_s`: they need a turn to run again.

        A turn that arrives while a doomed job's lease still looks alive finds nothing to do and ends;
        this is what still gives that job a turn once its lease has lapsed (a worker cut off, or lost
        with its host, whose own message would only come back after the visibility timeout)."""
        found: list[str] = self.r.zrangebyscore(keys.running(self.lane), "-inf", time.time(), start=0, num=limit)  # type: ignore[assignment]
        if not found:
            return []
        pipe = self.r.pipeline(transaction=False)
        for job_id in found:
            pipe.set(keys.rescued(job_id), "1", nx=True, px=int(every_s * 1000))
        return [job_id for job_id, fresh in zip(found, pipe.execute(), strict=True) if fresh]

    def missing_turns(self, every_s: float, limit: int = 1000) -> int:
        """How many waiting jobs have no turn (a broker message) and need one: checked at most once per
        `every_s` across all workers, so a lost turn is made up within about two checks."""
        queue = keys.broker_list(lane_queue(self.lane))
        found = self._missing_turns(keys=[keys.waiting(self.lane), queue, keys.turn_check(self.lane)], args=[every_s])
        return min(int(found), limit)

    def note_turn(self, task_id: str, job_id: str, owner: str, ttl_s: int) -> None:
        """Which job this turn runs, under which claim (read by the worker's parent if it has to kill
        the child: it ends or frees the job only while that claim still holds it)."""
        self.r.set(keys.turn(task_id), f"{job_id} {owner}", ex=ttl_s)

    def turn_job(self, task_id: str) -> tuple[str, str] | None:
        """(job id, lease owner) of the job the turn ran."""
        found: str | None = self.r.get(keys.turn(task_id))  # type: ignore[assignment]
        if not found:
            return None
        job_id, _, owner = found.partition(" ")
        return job_id, owner

    def set_members(self, leader_id: str, members: list[tuple[str, str]], ttl_s: int) -> None:
        """Record (job id, owner) of the leader's mates, for the worker parent that must end them
        if the call is killed; no members clears the record."""
        key = keys.micro_batch(leader_id)
        pipe = self.r.pipeline()
        pipe.delete(key)
        if members:
            pipe.hset(key, mapping=dict(members))
            pipe.expire(key, ttl_s)
        pipe.execute()

    def members(self, leader_id: str) -> list[tuple[str, str]]:
        found: dict[str, str] = self.r.hgetall(keys.micro_batch(leader_id))  # type: ignore[assignment]
        return list(found.items())

    def break_micro_batch(self, leader_id: str, leader_owner: str) -> list[str]:
        """A micro-batch's call was killed or crashed: the leader and every mate run again alone (each
        only while the claim that ran it still holds it).

        Returns the jobs that will (none when the leader ran no recorded micro-batch): each needs a
        turn (a message) to run again."""
        members = self.members(leader_id)
        if not members:
            return []
        again = [job_id for job_id, owner in [(leader_id, leader_owner), *members] if self.run_alone(job_id, owner)]
        self.set_members(leader_id, [], 0)
        return again

    def run_alone(self, job_id: str, owner: str = "") -> bool:
        """Its micro-batch broke (a hang, a crash): drop the lease now, and never batch this job again,
        so a job that breaks a call fails by itself and its mates succeed on their own."""
        return bool(self._drop(keys=[keys.job(job_id), keys.running(self.lane)], args=[job_id, owner, "1"]))

    def release(self, job_id: str, owner: str = "") -> bool:
        """Drop a running job's lease at once (its worker died), so the next free worker claims it."""
        return bool(self._drop(keys=[keys.job(job_id), keys.running(self.lane)], args=[job_id, owner, "0"]))

    def release_owned(self, process: str) -> list[str]:
        """Drop at once the lease of every running job that the dead process `process` still held
        (lease owners are `<process>/<claim>`): the jobs it was ending behind its last call. Those whose
        lease was already dropped are left alone. Returns the jobs released: each needs a turn."""
        held: list[str] = self.r.zrangebyscore(keys.running(self.lane), "(0", "+inf")  # type: ignore[assignment]
        if not held:
            return []
        pipe = self.r.pipeline(transaction=False)
        for job_id in held:
            pipe.hget(keys.job(job_id), "owner")
        owners = pipe.execute()
        prefix = process + "/"
        return [
            job_id
            for job_id, owner in zip(held, owners, strict=True)
            if owner and owner.startswith(prefix) and self.release(job_id, owner)  # the owner checked again, atomically
        ]
