"""The numbers of llm.c's token shard format, with no imports: settings validate against them without loading
numpy or the tokenizer (`shards.py` reads and writes the files)."""

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256  # little-endian int32: magic, version, token count, then zeros
MAX_SHARD_TOKENS = 2**31 - 1  # the header stores the token count as an int32
