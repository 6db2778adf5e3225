"""Subcommands of `drift` that belong to the engine itself."""
