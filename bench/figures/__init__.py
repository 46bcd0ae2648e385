"""One module per figure; each `measure(ctx, ...)` returns its figures as dicts."""
