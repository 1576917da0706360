"""The inference worker: Celery tasks (`tasks`), what a worker process holds (`context`), one job from
claim to its end with its micro-batch mates (`runner`, `batcher`), and test-only faults."""
