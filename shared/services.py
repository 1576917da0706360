"""What a process of the service holds: its settings, the stores over one Redis connection, the
bucket and the queue. The API builds one per app; a worker process builds one when it starts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import redis

from shared import catalog
from shared.auth import Authenticator, KeyStore
from shared.batches.store import BatchStore
from shared.config import Settings, get_settings
from shared.db import connect
from shared.files import Files
from shared.jobs.deliveries import Deliveries, Notifier
from shared.jobs.leases import Leases
from shared.jobs.registry import Registry
from shared.jobs.store import JobStore
from shared.queue import Queue, make_celery
from shared.quotas import Quotas
from shared.storage import Storage
from shared.webhook_secrets import WebhookSecrets


@dataclass
class Services:
    settings: Settings
    jobs: JobStore
    leases: Leases
    registry: Registry
    batches: BatchStore
    storage: Storage
    queue: Queue
    deliveries: Deliveries
    notify: Notifier
    auth: Authenticator
    keystore: KeyStore
    webhook_secrets: WebhookSecrets
    quotas: Quotas
    files: Files

    @property
    def r(self) -> redis.Redis:
        """The Redis connection the stores share."""
        return self.jobs.r


def build_services(settings: Settings, queue: Queue | None = None, interactive: bool = False) -> Services:
    """Every store and client for `settings`; `queue` when the process already has its Celery app (a
    worker); `interactive` for the API, whose storage calls give up within seconds (a 503 to retry)."""
    r = connect(settings)
    jobs = JobStore(r, settings.job_ttl_s)
    storage = Storage(settings, interactive)
    lane = catalog.lane(catalog.worker_model(settings), settings)  # an inference worker's model's
    queue = queue or Queue(make_celery(settings), lane)
    keystore = KeyStore(r)
    deliveries = Deliveries(r, queue, settings.job_ttl_s)
    return Services(
        settings=settings,
        jobs=jobs,
        leases=Leases(r, settings.job_ttl_s, settings.job_max_attempts, lane),
        registry=Registry(r, lane),
        batches=BatchStore(r, settings.job_ttl_s, settings.max_open_batches_per_tenant),
        storage=storage,
        queue=queue,
        deliveries=deliveries,
        notify=Notifier(jobs, storage, deliveries, settings.public_url),
        auth=Authenticator(settings.auth, settings.api_key_map(), keystore),
        keystore=keystore,
        webhook_secrets=WebhookSecrets(r, settings),
        quotas=Quotas(r, settings),
        files=Files(r, storage, settings),
    )


@lru_cache
def process_services() -> Services:
    """This process's services from its environment, built once (worker processes)."""
    return build_services(get_settings())
