"""Job records and their status changes: create, read, move forward, ask to cancel.

Finished jobs expire from Redis after `ttl_s`; their manifest in S3 stays (`shared.jobs.view`).
Claims, leases and micro-batch membership are `shared.jobs.leases`; how a job ends as a whole
(manifest, webhook, outputs) is `shared.jobs.lifecycle`.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import redis

from shared import keys
from shared.db import NotReplicated, acked
from shared.jobs import scripts
from shared.jobs.record import AHEAD_AT_SUBMIT, ETA_AT_SUBMIT, JobRecord, encode
from shared.queue import lane_queue
from shared.schemas import JobInput, Status

MAX_TENANT_INDEX = 100_000


class QueueFull(Exception):
    """A cap of `JobStore.create` was reached: 'queue_full' or 'tenant_queue_full' (the message)."""


class JobStore:
    def __init__(self, r: redis.Redis, ttl_s: int):
        self.r, self.ttl_s = r, ttl_s
        self._create = r.register_script(scripts.CREATE)
        self._transition = r.register_script(scripts.TRANSITION)
        self._cancel = r.register_script(scripts.CANCEL)
        self._concluded = r.register_script(scripts.CONCLUDED)
        self._due = r.register_script(scripts.DUE_TO_CONCLUDE)

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    def create(
        self,
        job_id: str,
        tenant: str,
        params: JobInput,
        image_key: str,
        mask_key: str,
        compat_key: str = "",
        batch_id: str = "",
        weight: float = 1.0,
        turn: str = "",
        trace: str = "",
        idempotency: tuple[str, str, int, str] | None = None,
        caps: tuple[int, int] = (0, 0),
        extra: dict[str, str] | None = None,
        lane: str = "",
        model_name: str = "",
        adapters: list[dict[str, Any]] | None = None,
    ) -> JobRecord:
        """Record a queued job in its class's fair queue (`weight`: its tenant's share) and push its
        `turn` (a broker message, `Queue.turn_message`) in the same step; `compat_key` lets workers
        find jobs that can share its pipeline call. `idempotency` (key, value, ttl, our reservation): the
        request's Idempotency-Key names the job in that same step. `caps` (jobs waiting in all, the
        tenant's): checked in that step too, `QueueFull` when one is reached. Safe to run twice (the id is
        the token). The record answered knows how many jobs were ahead of it (`JobRecord.ahead_at_submit`).
        `extra`: more fields of the record (how the job was asked for: `shared.predictions`). `model_name`,
        `lane`: its model and that model's lane (`shared.catalog`): its turn goes to that model's queue."""
        fields = {
            "id": job_id,
            "tenant": tenant,
            "status": Status.queued.value,
            "created_at": repr(time.time()),
            "input": params.model_dump_json(),
            "image_key": image_key,
            "mask_key": mask_key,
            "progress_step": "0",
            "progress_total": str(int(params.num_inference_steps * params.strength)),
            "attempts": "0",
            "bkey": compat_key,
            "rows": str(params.num_outputs),
            "priority": params.priority,
        }
        if extra:
            fields.update(extra)
        if batch_id:
            fields["batch"] = batch_id
        if lane:
            fields["lane"] = lane
        if model_name:
            fields["model_name"] = model_name
        if adapters:
            fields["adapters"] = json.dumps(adapters)  # its LoRA adapters by id, content hash and scale
        if trace:
            fields["trace"] = trace  # the W3C traceparent of its submit: the job's trace (shared.tracing)
        flat = [x for kv in fields.items() for x in kv]
        idem_key, idem_value, idem_ttl, reserved = idempotency or (keys.job(job_id), "", 0, "")
        job_keys, args = (
            [
                *keys.for_job(job_id, tenant, compat_key, params.priority, lane=lane),
                keys.tenant_jobs(tenant),
                keys.sequence(),
                keys.broker_list(lane_queue(lane)),
                idem_key,
                keys.ready("interactive", lane),
                keys.durations(lane),
                keys.lane_workers(lane),
            ],
            [
                job_id,
                MAX_TENANT_INDEX,
                tenant,
                repr(params.num_outputs / weight),
                turn,
                idem_value,
                idem_ttl,
                reserved,
                *caps,
                repr(time.time()),
                *flat,
            ],
        )
        try:
            seq, ahead, eta = acked(self.r, self._create, job_keys, args)
        except NotReplicated as exc:
            if not exc.answer or exc.answer[0]:
                raise
            seq, ahead, eta = exc.answer  # a cap refused it: nothing was written, no replica is needed
        if not seq:
            raise QueueFull(str(ahead))
        fields["seq"] = str(seq)
        if int(ahead) >= 0:
            fields[AHEAD_AT_SUBMIT] = str(ahead)
            fields[ETA_AT_SUBMIT] = str(eta)
        return JobRecord(fields)

    def get(self, job_id: str) -> JobRecord | None:
        fields = self.r.hgetall(keys.job(job_id))
        return JobRecord(fields) if fields else None  # type: ignore[arg-type]

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        pipe = self.r.pipeline(transaction=False)
        for jid in job_ids:
            pipe.hgetall(keys.job(jid))
        return [JobRecord(f) if f else None for f in pipe.execute()]

    def transition(
        self, rec: JobRecord, status: Status, owner: str = "", step: str = "", **fields: Any
    ) -> tuple[bool, Status | None]:
        """Move a job forward to `status`, setting `fields`: (moved, status before). Only `owner`'s
        lease may move it when given; a job already at or past `status` stays as it is. `step`
        (`new_step()`): the same token on every try of one change, so a try that runs again after
        its reply was lost answers as the first did."""
        if status.is_terminal:
            fields.setdefault("finished_at", time.time())
        flat = [x for k, v in fields.items() for x in (k, encode(v))]
        err = fields.get("error")
        stat = f"finished:{status.value}:{err.get('code', '') if isinstance(err, dict) else ''}"
        args = [rec.id, keys.events(rec.id), status.value, owner, self.ttl_s, stat, step or new_step(), *flat]
        res, prev = acked(self.r, self._transition, rec.keys, args)
        return res == "ok", (Status(prev) if prev else None)

    def request_cancel(self, rec: JobRecord, step: str = "") -> str:
        """'canceled' (it was queued: ended now), 'requested' (running: stops at its next step),
        'missing', or 'ended' (it had ended already). `step` as for `transition`."""
        args = [rec.id, keys.events(rec.id), repr(time.time()), self.ttl_s, step or new_step()]
        return str(acked(self.r, self._cancel, rec.keys, args))

    def concluded(self, job_id: str, whatever: bool = False) -> str:
        """Its ending is concluded: 'done', or 'erase' when the job was deleted meanwhile (erase it,
        then call again `whatever`)."""
        args = [job_id, "1" if whatever else "0"]
        return str(self._concluded(keys=[keys.job(job_id), keys.concluding(), keys.erased(job_id)], args=args))

    def due_to_conclude(self, age_s: float, limit: int) -> list[str]:
        """Jobs that ended `age_s` ago or more and are not concluded: each is not handed out again for
        as long (one sweeper at a time takes it)."""
        return list(self._due(keys=[keys.concluding()], args=[age_s, limit]))

    def queue_position(self, rec: JobRecord) -> int | None:
        """Jobs that will start before this queued one: its place in its class's run order, behind
        every interactive job if it is bulk. None once it has started."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zrank(keys.ready(rec.priority, rec.lane), keys.ready_member(int(rec.fields.get("seq") or 0), rec.id))
        pipe.zcard(keys.ready("interactive", rec.lane))
        rank, interactive = pipe.execute()
        if rank is None:
            return None
        return int(rank) + (int(interactive) if rec.priority == "bulk" else 0)

    def waiting_counts(self, tenant: str, lane: str = "") -> tuple[int, int]:
        """Jobs waiting for the lane's model, and the tenant's in all: one round trip (every submit asks)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zcard(keys.waiting(lane))
        pipe.zcard(keys.tenant_waiting(tenant))
        total, mine = pipe.execute()
        return int(total), int(mine)

    def list_ids(self, tenant: str, limit: int, cursor: str | None) -> list[str]:
        """The tenant's job ids, newest first, strictly older than `cursor`."""
        top = f"({cursor}" if cursor else "+"
        return self.r.zrange(keys.tenant_jobs(tenant), top, "-", desc=True, bylex=True, offset=0, num=limit)  # type: ignore[return-value]


def new_step() -> str:
    """A token for one change, kept across its tries (see `JobStore.transition`)."""
    return secrets.token_hex(8)
