"""Files: checkpoints, conversion, llm.c weights, GGUF export, tokenizer files."""
