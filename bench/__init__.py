"""Benchmarks of the pipeline beside their references (bare Celery, raw SQL, a no-I/O
endpoint), run on real PostgreSQL, Redis and RabbitMQ with real worker processes.

`pipeline bench [--quick]` or `make bench`; results in bench/results/latest.json.
Not part of the wheel: it imports helpers from tests/ and needs the servers they need.
"""
