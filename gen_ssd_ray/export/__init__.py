"""Export: the chosen rows of generation folders as a Hugging Face dataset that TRL's trainers take as is
(`python -m jobs.export`; config in gen_ssd_ray.export.config, the work in gen_ssd_ray.export.run)."""
