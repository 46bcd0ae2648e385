"""The domain core: jobs, ledger, pricing, storage, settings, database. Knows no Flask or Celery."""
