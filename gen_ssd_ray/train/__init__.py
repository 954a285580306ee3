"""Fine-tuning: DeepSpeed ZeRO supervised fine-tuning of the student through Ray Train.

- `config`: the typed `FinetuneConfig` and the run fingerprint.
- `data`: rows in (generation shards, Parquet, JSONL; only the needed columns), filters (the safe
  language of `gen_ssd_ray.common.filters`), chat-template tokenization with the loss
  on the response, the deterministic packed batch plan.
- `worker`: what each Ray Train worker runs (DeepSpeed engine, resume, checkpoints, export).
- `checkpoint`: the output folder's layout, its atomic files, and which checkpoint is complete and
  resumable (never deleted on a guess).
- `nonfinite`: NaN/inf steps: skipped, counted, and the run failed past `runtime.max_nonfinite_steps`.
- `run`: the driver behind `python -m jobs.finetune`.
"""
