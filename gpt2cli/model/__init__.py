"""The GPT-2 model: the module and its KV cache, attention, the named shapes, FLOPs."""
