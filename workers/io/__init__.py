"""The I/O worker (`inpaint webhooks`): webhook deliveries and scoring-batch steps, network and
storage waits kept off the GPU workers."""
