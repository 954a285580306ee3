"""What every job shares: config loading and the shared config sections, prompts, problems, models,
the dispatcher over Ray actors, the failure model and the entry-point wrapper, verification,
progress, durable files. Nothing here knows about one job's algorithm or output layout."""
