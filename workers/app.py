"""The workers' Celery app: the shared configuration (`shared.queue`), built from this process's settings."""

from shared.config import get_settings
from shared.queue import make_celery

app = make_celery(get_settings())
