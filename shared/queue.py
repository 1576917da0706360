"""The Celery app both sides use: the API only sends task names and job ids, the workers consume.

Configured for long GPU jobs: a message is acknowledged only after its job has ended (late acks),
put back when its worker dies, one message prefetched per process, and a broker visibility timeout
above the hard time limit so a live job is never handed to a second worker.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid

import redis
from celery import Celery
from kombu import serialization
from kombu.transport import redis as kombu_redis

from shared.config import Settings
from shared.db import CONNECT_TIMEOUT_S, FollowingConnection, broker_url, sentinel_options

log = logging.getLogger(__name__)

INFERENCE_QUEUE = "inpaint"  # the default model's (shared.catalog); another model's is `lane_queue`
# The queue of the I/O worker (`inpaint webhooks`): webhook deliveries and scoring-batch steps, network
# and storage waits that must never hold a GPU. Its name predates the batch steps; it stays for deployments.
IO_QUEUE = "webhooks"
RUN_TASK = "inpaint.run"
DELIVER_TASK = "inpaint.webhooks.deliver"
BATCH_STEP_TASK = "inpaint.batches.expand"  # a scoring batch's next step (its name from earlier releases)
# Longer than a store's call (`shared.db`): a broker call that times out makes Celery reconnect.
BROKER_SOCKET_TIMEOUT_S = 5.0
BROKER_HEALTH_CHECK_S = 5  # a BRPOP overdue this long past its own timeout is on a dead connection


def lane_queue(lane: str) -> str:
    """The Celery queue of a model's lane (`shared.catalog.lane`): its workers consume it, KEDA scales
    them on its broker list."""
    return f"{INFERENCE_QUEUE}.{lane}" if lane else INFERENCE_QUEUE


def make_celery(settings: Settings) -> Celery:
    """A Celery app for `settings`; no result backend: the job store is the source of truth."""
    app = Celery("inpaint", broker=broker_url(settings), set_as_current=False)
    app.conf.update(
        task_default_queue=INFERENCE_QUEUE,
        task_routes={
            RUN_TASK: {"queue": INFERENCE_QUEUE},
            DELIVER_TASK: {"queue": IO_QUEUE},
            BATCH_STEP_TASK: {"queue": IO_QUEUE},
        },
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task that raises is rejected without requeue all the same (celery/worker/request.py,
        # `Request.on_failure`): its message is gone. The workers' heartbeat gives every waiting job that
        # lacks a turn a new one (`Leases.missing_turns`), so no job waits on a dropped message.
        task_acks_on_failure_or_timeout=False,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_time_limit_s,
        worker_prefetch_multiplier=1,
        # Loading a real pipeline takes far longer than Celery's 4 s default for a child to say it is up.
        worker_proc_alive_timeout=900,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # No `celery control`/`inspect`: the job store is the control plane (cancel, readiness), and a
        # worker then holds no pub/sub connection, one less socket whose loss restarts its consumer.
        worker_enable_remote_control=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for messages of dead workers every N seconds (kombu's default is ~100 s).
            "unacked_restore_interval": settings.broker_restore_interval_s,
            "unacked_restore_throttle": 1,
            # A broker whose host vanished sends no reset: without a socket timeout a publish or an ack
            # waits on it for ever, and a BRPOP is dropped only once overdue by the health interval.
            "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "socket_keepalive": True,
            "health_check_interval": BROKER_HEALTH_CHECK_S,
            **_sentinel_options(settings),
        },
        broker_pool_limit=32,
    )
    return app


def _sentinel_options(settings: Settings) -> dict[str, object]:
    """With Sentinels (`INPAINT_REDIS_SENTINELS`): the primary's name, and the Sentinels' own connections
    with the socket timeouts and their own password (not the primary's)."""
    if not settings.redis_sentinels:
        return {}
    return {"master_name": settings.redis_master, "sentinel_kwargs": sentinel_options(settings)}


# What a worker needs of a turn's headers (celery/worker/request.py reads every other one with .get).
_TURN_HEADERS = ("lang", "task", "id", "retries")


class Queue:
    """What the service publishes: a job's message, a webhook delivery, a scoring batch's next step."""

    def __init__(self, celery: Celery, lane: str = ""):
        self.celery = celery
        self.lane = lane  # a worker's: the lane (model) whose jobs its turns are for

    def send_job(self, job_id: str) -> None:
        """A turn for a job of this process's lane (another one: its own came with its record, `turn_message`)."""
        self.celery.send_task(RUN_TASK, args=[job_id], queue=lane_queue(self.lane))

    def turn_message(self, job_id: str, lane: str = "") -> str:
        """A job's turn as kombu's Redis transport stores it in the queue's list, for the job store to
        push in the same atomic step that records the job: no job without its turn, no turn without
        its job, even when Redis loses its last second of writes. Built by Celery's own task-message
        code (protocol 2), so a worker reads it as any other message, less what a worker reads as
        absent anyway (nulls, the log's reprs, the sender's name): it waits in Redis with every queued job.
        """
        task_id = str(uuid.uuid4())
        msg = self.celery.amqp.as_task_v2(task_id, RUN_TASK, args=[job_id], kwargs={})
        headers = {k: v for k, v in msg.headers.items() if k in _TURN_HEADERS}
        content_type, encoding, body = serialization.dumps(([job_id], {}, {}), serializer="json")
        payload = body if isinstance(body, bytes) else body.encode(encoding)
        envelope = {
            "body": base64.b64encode(payload).decode(),
            "content-encoding": encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": {
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": lane_queue(lane)},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        return json.dumps(envelope)

    def send_delivery(self, series: str, token: str) -> None:
        """One attempt of a scheduled delivery (`shared.jobs.deliveries`), under its claim token."""
        self.celery.send_task(DELIVER_TASK, args=[series, token], queue=IO_QUEUE)

    def send_batch_step(self, batch_id: str, countdown: float | None = None) -> None:
        self.celery.send_task(BATCH_STEP_TASK, args=[batch_id], queue=IO_QUEUE, countdown=countdown)


class _QoS(kombu_redis.QoS):
    """kombu's Redis QoS, except that putting messages back on a lost connection never raises.

    When the broker connection drops, kombu closes the channel and tries to push the messages this
    worker holds (running or waiting for a countdown) back onto the queue. If the connection object
    is already torn down, that raises AttributeError, which Celery reports as an "Unrecoverable
    error" and the whole worker exits (seen when Redis restarts). Nothing is lost by skipping it:
    each of those messages is still in Redis' unacked set, and the visibility timeout returns it.
    """

    def restore_unacked_once(self, stderr: object = None) -> None:
        held = len(self._delivered)
        try:
            super().restore_unacked_once(stderr)
        except (AttributeError, OSError, redis.RedisError) as exc:  # the connection is gone; see above
            log.warning(
                "could not put back %d message(s) on a lost broker connection (%r); "
                "the broker's visibility timeout returns them",
                held,
                exc,
            )


kombu_redis.Channel.QoS = _QoS  # every Redis channel of this process, whatever the URL's scheme
# With Sentinels, the broker's connections let go of a primary cut off from its replicas as the
# stores' do (NOREPLICAS), not only of a demoted one.
kombu_redis.SentinelChannel.connection_class = FollowingConnection
