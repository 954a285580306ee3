"""The generation job (`python -m jobs.generate`): config, driver, beam managers, output shards."""
