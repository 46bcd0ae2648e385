"""Celery: the app, the chain's tasks, the sweeper. A task turns a message into one use case."""
