"""Every option, validated (pydantic-settings), and where settings come from. Torch-free."""
