"""The processes around the core: the `pipeline` command, the demo, the local supervisor,
and the runtime (the one place that wires concrete pieces together)."""
