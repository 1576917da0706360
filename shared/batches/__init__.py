"""Scoring batches (`/v1/batches`, the model card's batch endpoint): many rows, each row a job."""
