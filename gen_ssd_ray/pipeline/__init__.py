"""The whole experiment as one resumable job (`python -m jobs.pipeline`, `make run`) and its report."""
