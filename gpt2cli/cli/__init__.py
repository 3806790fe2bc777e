"""The command-line layer: Typer commands that parse, build settings, call the core and present results."""
