"""The inference itself: a pipeline and requests in, one result or one error per request out.

Nothing here knows of Celery, Redis, S3 or HTTP (`workers.gpu` runs it for jobs)."""
