"""Running models: the training engine (``trainer``: one loop for every task, with EMA weights, learning-rate
schedules and torch.distributed setup) and the evaluation loops and per-task glue the tools use."""
