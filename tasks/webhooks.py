"""Webhook delivery on the maintenance queue: beat's relay claims due rows, a task sends each.

The rows in webhook_deliveries are the truth (pipeline/webhooks.py): a relay message that
expires, or a delivery message that is lost, only delays a webhook until its claim's lease
runs out and the next relay claims it again.
"""

from __future__ import annotations

import uuid

from pipeline import provider_keys, webhooks
from tasks import names

# Deliveries claimed per relay run; the rest wait for the next run, seconds later.
RELAY_BATCH = 200


def register(app) -> None:
    timeout = app.settings.webhook_timeout_seconds

    def policy():
        return webhooks.Policy.from_settings(app.settings)

    @app.task(name=names.WEBHOOK_RELAY, shared=False, ignore_result=True, soft_time_limit=30,
              time_limit=45, acks_late=False)
    def relay_webhooks():
        # acks_late off: a lost run is made up by beat's next one, seconds later.
        from tasks.app import runtime_of

        claimed = webhooks.claim_due(runtime_of(app).engine, limit=RELAY_BATCH,
                                     lease_seconds=policy().lease_seconds)
        for delivery_id, token in claimed:
            deliver_webhook.apply_async((str(delivery_id), token),
                                        queue=names.MAINTENANCE_QUEUE)
        return len(claimed)

    # A connect and a read, each bounded by the timeout, and the database work around them.
    @app.task(name=names.WEBHOOK_DELIVER, shared=False, ignore_result=True,
              soft_time_limit=2 * timeout + 30, time_limit=2 * timeout + 45)
    def deliver_webhook(delivery_id: str, token: str):
        """One attempt at one delivery; ids only in the message (Flower shows arguments)."""
        from tasks.app import runtime_of

        rt = runtime_of(app)
        return webhooks.deliver(rt.engine, rt.storage,
                                provider_keys.cipher(rt.settings.provider_key_secrets),
                                policy(), delivery_id=uuid.UUID(delivery_id), token=token,
                                link_ttl=rt.settings.link_ttl_seconds)
