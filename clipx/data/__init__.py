"""Data: shard lists, streaming webdataset pipelines, transforms and the tokenizer wrapper."""
