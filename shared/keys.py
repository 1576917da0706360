"""Every Redis key the service uses, named once.

Lua scripts never build a key name themselves: the caller passes each key as KEYS, so the names
live here only. (A script still touches keys of many jobs and sets at once: the service runs on one
Redis primary, not Redis Cluster, whose hash slots these scripts would cross.)
The strings are unchanged from earlier releases, so an upgrade needs no migration.
"""

from __future__ import annotations

import hashlib

PREFIX = "inpaint:"


def job(job_id: str) -> str:
    """The job's record (a hash); expires `job_ttl_s` after the job ends."""
    return f"{PREFIX}job:{job_id}"


def broker_list(queue: str) -> str:
    """The list kombu's Redis transport keeps a Celery queue's messages in (priority 0: the queue's name)."""
    return queue


def _in_lane(key: str, lane: str) -> str:
    """A key of one model's lane (`shared.catalog.lane`): the default model's ('') keeps the names of
    single-model releases."""
    return f"{key}:lane:{lane}" if lane else key


def waiting(lane: str = "") -> str:
    """A lane's waiting jobs, in queue order (a sorted set by submit sequence)."""
    return _in_lane(f"{PREFIX}queue:inpaint", lane)


def sequence() -> str:
    """The submit counter that orders the queue."""
    return f"{PREFIX}seq"


def tenant_waiting(tenant: str) -> str:
    """The tenant's waiting jobs, for its queue limit."""
    return f"{PREFIX}tqueue:{tenant}"


def compatible_waiting(compat_key: str, priority: str = "interactive", lane: str = "") -> str:
    """Waiting jobs of a lane's priority class that can share one pipeline call (same compatibility
    key), oldest first."""
    key = f"{PREFIX}bq:{compat_key}" if priority == "interactive" else f"{PREFIX}bq:{priority}:{compat_key}"
    return _in_lane(key, lane)


def ready(priority: str, lane: str = "") -> str:
    """The waiting jobs of a lane's priority class in the order they will run: scored by their start
    tag in the class's fair queue (ties: the older job first)."""
    return _in_lane(f"{PREFIX}ready:{priority}", lane)


def ready_member(seq: int, job_id: str) -> str:
    """A job in a `ready` set: its submit sequence first, so that jobs with equal start tags run oldest first."""
    return f"{seq:016d}:{job_id}"


def fair_queue(priority: str, lane: str = "") -> str:
    """A class's fair-queue state: its virtual time (`v`). (Hash fields `t:<tenant>` of earlier releases
    are no longer read, and each is deleted at its tenant's next submit: `finish_tags` holds them now.)"""
    return _in_lane(f"{PREFIX}fq:{priority}", lane)


def finish_tags(priority: str, lane: str = "") -> str:
    """Each tenant's last finish tag in the class's fair queue (a sorted set): only tenants whose tag is
    ahead of the virtual time are kept, so it holds at most the tenants with recent work."""
    return _in_lane(f"{PREFIX}fq-finish:{priority}", lane)


def concluding() -> str:
    """Jobs that have ended but whose ending is not yet concluded (manifest, terminal webhook, batch
    step), scored by when they ended: whatever process ended a job concludes it, and a sweeper
    concludes what a process that died left (`shared.jobs.lifecycle`)."""
    return f"{PREFIX}concluding"


def erased(job_id: str) -> str:
    """Set when a job is deleted (`DELETE /v1/jobs/{id}`): nothing of it is shown or sent after that."""
    return f"{PREFIX}erased:{job_id}"


def turn_check(lane: str = "") -> str:
    """A lane's last count of queued jobs missing a turn, and when it was taken (`shared.jobs.leases`)."""
    return _in_lane(f"{PREFIX}turn-check", lane)


def running(lane: str = "") -> str:
    """A lane's running jobs, scored by when their lease runs out: one whose lease has lapsed may be
    claimed again (by a worker of its model)."""
    return _in_lane(f"{PREFIX}running", lane)


def tenant_jobs(tenant: str) -> str:
    """The tenant's job ids, for listing (newest first, capped)."""
    return f"{PREFIX}tenant:{tenant}:jobs"


def events(job_id: str) -> str:
    """Pub/sub channel of the job's status and progress events."""
    return f"{PREFIX}events:{job_id}"


def deliveries(job_id: str) -> str:
    """The job's webhook delivery log."""
    return f"{PREFIX}webhooks:{job_id}"


def delivery(series: str) -> str:
    """A scheduled webhook delivery: its message, attempts so far and current claim."""
    return f"{PREFIX}delivery:{series}"


def delivery_claim(token: str) -> str:
    """What one claim of due deliveries took (kept briefly: its second run answers the same)."""
    return f"{PREFIX}delivery-claim:{token}"


def deliveries_due() -> str:
    """Scheduled deliveries, scored by when their next attempt is due."""
    return f"{PREFIX}deliveries:due"


def rescued(job_id: str) -> str:
    """Held a while after a job whose lease lapsed was given a turn: one turn per lapse, not one per worker."""
    return f"{PREFIX}rescued:{job_id}"


def turn(task_id: str) -> str:
    """The job a turn (a broker message, by its task id) is running: for the worker's parent, which
    must end or free that job if it kills the child."""
    return f"{PREFIX}turn:{task_id}"


def micro_batch(leader_id: str) -> str:
    """The other jobs in the leader's pipeline call, for the worker parent that must end them."""
    return f"{PREFIX}batch:{leader_id}"


def durations(lane: str = "") -> str:
    """A lane's recent seconds of worker time per job, for queue ETAs."""
    return _in_lane(f"{PREFIX}durations", lane)


def workers() -> str:
    """Ready inference workers, scored by when their heartbeat runs out."""
    return f"{PREFIX}workers"


def lane_workers(lane: str) -> str:
    """The ready inference workers of one lane (one model), scored as `workers`: its queue's ETAs."""
    return f"{PREFIX}lane-workers:{lane}"


def worker(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def worker_gone(name: str) -> str:
    """Set when a worker process is known dead or being killed: its heartbeat no longer registers it."""
    return f"{PREFIX}worker-gone:{name}"


def api_keys() -> str:
    """SHA-256 of each API key → its id, tenant and creation time (JSON; a bare tenant in old releases)."""
    return f"{PREFIX}apikeys"


def api_key_ids() -> str:
    """Key id → the SHA-256 of its key (revoking by id)."""
    return f"{PREFIX}apikey-ids"


def webhook_secrets(tenant: str) -> str:
    """The tenant's webhook signing secrets, encrypted: current, previous and until when it signs."""
    return f"{PREFIX}whsec:{tenant}"


def held(tenant: str) -> str:
    """The connections the tenant holds open (event streams, waits), scored by when each lapses unless
    renewed."""
    return f"{PREFIX}held:{tenant}"


def open_batches(tenant: str) -> str:
    """The tenant's scoring batches that have not finished, scored by creation time."""
    return f"{PREFIX}tenant:{tenant}:batches"


def rate(name: str, tenant: str, window: int) -> str:
    """A fixed-window counter of `name` for the tenant (the window's number)."""
    return f"{PREFIX}rate:{name}:{tenant}:{window}"


def ended() -> str:
    """Ended jobs (`<tenant>/<id>`) scored by when they ended: whose images expire (INPAINT_RETENTION_S)."""
    return f"{PREFIX}ended"


def file(file_id: str) -> str:
    """An uploaded file's record (`/v1/files`, JSON); expires with the file."""
    return f"{PREFIX}file:{file_id}"


def tenant_files(tenant: str) -> str:
    """The tenant's file ids scored by when each expires: for listing and its cap."""
    return f"{PREFIX}tenant:{tenant}:files"


def files_expiring() -> str:
    """Every file (`<tenant>/<id>`) scored by when it expires: whose objects the sweep deletes."""
    return f"{PREFIX}files:expiring"


def lora(tenant: str, lora_id: str) -> str:
    """A tenant's LoRA adapter record (`/v1/loras`, JSON). Ids come from the content: two tenants with
    the same file hold one id each, under their own key."""
    return f"{PREFIX}lora:{tenant}:{lora_id}"


def tenant_loras(tenant: str) -> str:
    """The tenant's adapter ids scored by when each was added: for listing."""
    return f"{PREFIX}tenant:{tenant}:loras"


def lora_owners(sha256: str) -> str:
    """The tenants holding an adapter's bytes (one S3 object per content): the last to delete it deletes them."""
    return f"{PREFIX}lora-owners:{sha256}"


def lora_bytes_lock(sha256: str) -> str:
    """Held while an adapter's S3 object is written or deleted, so an upload never races a delete."""
    return f"{PREFIX}lora-lock:{sha256}"


def stats() -> str:
    """Service-wide counters (shared.metrics)."""
    return f"{PREFIX}stats"


def idempotency(tenant: str, key: str) -> str:
    return f"{PREFIX}idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"


def batch(batch_id: str) -> str:
    """A scoring batch (`/v1/batches`): its state and counts."""
    return f"{PREFIX}jobbatch:{batch_id}"


def batch_jobs(batch_id: str) -> str:
    """The batch's rows in input order: a job id, or '' for a rejected row."""
    return f"{batch(batch_id)}:jobs"


def batch_rejected(batch_id: str) -> str:
    """Row index → the error that kept the row from becoming a job."""
    return f"{batch(batch_id)}:rejected"


def batch_lock(batch_id: str) -> str:
    """Held while one process advances the batch."""
    return f"{batch(batch_id)}:advancing"


def for_job(
    job_id: str, tenant: str, compat_key: str, priority: str = "interactive", batch_id: str = "", lane: str = ""
) -> list[str]:
    """The keys a job's status change touches, in the order the job store's scripts expect them:
    its record, the waiting sets it leaves, the service counters, the running set, its class's fair
    queue and its tenants' finish tags, the jobs to conclude and, for a batch row, its batch. Each of
    its lane's (its model's) where the lanes differ."""
    out = [
        job(job_id), waiting(lane), tenant_waiting(tenant), compatible_waiting(compat_key, priority, lane), stats(),
        ready(priority, lane), running(lane), fair_queue(priority, lane), concluding(), finish_tags(priority, lane),
    ]  # fmt: skip
    return [*out, batch(batch_id)] if batch_id else out


def fault_failing_turns() -> str:
    """Test hook: how many more turns raise before they claim (workers/gpu/faults.py)."""
    return f"{PREFIX}fault:failing-turns"


def fault_runs(job_id: str) -> str:
    """Test hook: how many times a job really started running (workers/gpu/faults.py)."""
    return f"{PREFIX}fault:runs:{job_id}"


def confirmations() -> str:
    """A counter written only to be replicated: `shared.db.confirm` waits for a replica to hold it."""
    return f"{PREFIX}confirmations"


def versions_seen() -> str:
    """Hash of `owner/name:revision` → when this service first served that model version
    (its `created_at` in Replicate's API: `shared.predictions`)."""
    return f"{PREFIX}versions-seen"
