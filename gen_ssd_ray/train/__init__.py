"""Fine-tuning: DeepSpeed ZeRO supervised fine-tuning of the student through Ray Train.

- `config`: the typed `FinetuneConfig` and the run fingerprint.
- `data`: rows in (generation shards, Parquet, JSONL), filters, chat-template tokenization with the loss
  on the response, the deterministic packed batch plan.
- `worker`: what each Ray Train worker runs (DeepSpeed engine, resume, checkpoints, export).
- `checkpoint`: the output folder's layout and its atomic files.
- `run`: the driver behind `python -m jobs.finetune`.
"""
