"""Generation: the text generator, logit filters, drafting (prompt lookup), weight-only quantization."""
