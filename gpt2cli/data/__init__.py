"""Text to tokens: the GPT-2 tokenizer, text sources and the parallel encoder, Parquet, llm.c shards, the token
cache, the training inputs."""
