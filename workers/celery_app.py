"""The worker side's Celery app: the shared configuration, built from this process's settings."""

from shared.config import get_settings
from shared.queue import INFERENCE_QUEUE, RUN_TASK, make_celery

app = make_celery(get_settings())


def send_job(job_id: str) -> None:
    """Queue a message for the job again (its current one is being acknowledged or was lost)."""
    app.send_task(RUN_TASK, args=[job_id], queue=INFERENCE_QUEUE)
