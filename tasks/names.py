"""Stable task and queue names: moving a module must never orphan queued messages."""

from pipeline import catalogue

RESERVE = "pipeline.reserve"
GENERATE = "pipeline.generate"
FINISH = "pipeline.finish"  # store, then settle: the chain's last step
# The chain's last two steps before they ran as FINISH: still served, for the messages
# of chains published before (an upgrade must never orphan a queued step).
STORE = "pipeline.store"
SETTLE = "pipeline.settle"
FAIL_AND_REFUND = "pipeline.fail_and_refund"
SWEEP = "pipeline.sweep"
LEDGER_AUDIT = "pipeline.ledger_audit"
PRUNE = "pipeline.prune"
WEBHOOK_RELAY = "pipeline.webhook_relay"
WEBHOOK_DELIVER = "pipeline.webhook_deliver"

PIPELINE_QUEUE = "pipeline"
LOCAL_QUEUE = "local"
MAINTENANCE_QUEUE = "maintenance"
SAAS_QUEUES = catalogue.SAAS_QUEUES
GPU_QUEUES = catalogue.GPU_QUEUES
ALL_QUEUES = (PIPELINE_QUEUE, LOCAL_QUEUE, MAINTENANCE_QUEUE, *SAAS_QUEUES, *GPU_QUEUES)

# `pipeline worker --queues <family>` expands these.
QUEUE_FAMILIES = {
    "pipeline": (PIPELINE_QUEUE,),
    "local": (LOCAL_QUEUE,),
    "saas": SAAS_QUEUES,
    "gpu": GPU_QUEUES,
    "maintenance": (MAINTENANCE_QUEUE,),
    "all": ALL_QUEUES,
}
