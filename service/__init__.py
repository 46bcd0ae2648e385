"""The processes around the core: the `pipeline` command, the demo, the local process supervisor, and the one place that wires concrete pieces together (the runtime)."""
