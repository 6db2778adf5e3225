"""Model definitions (Llama family) over Drift's paged KV cache, and their loaders."""
