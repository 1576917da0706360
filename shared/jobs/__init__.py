"""A job's life: submitted, queued, claimed by a worker, ended once (`lifecycle`), read back (`view`)."""
