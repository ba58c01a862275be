"""lm-eval tasks on the demo zoo's skills (offline JSONL data; see evomerge.zoo.write_task_data)."""
