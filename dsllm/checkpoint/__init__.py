"""Training checkpoints, one owner: what one is on disk (`store`: tags, the marker, lineage, staging and
commit, pruning), what DeepSpeed puts in it (`states`: model states, consolidated weights, RNG), and
how a run saves, chooses, verifies and loads one (`checkpointer`: `Checkpointer`, universal conversion).

Model folders (config.json + model.safetensors + tokenizer.json, what generate/evaluate/export read)
are not training checkpoints: `dsllm.model_dir` owns them."""
