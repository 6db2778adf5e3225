"""The node agent's HTTP server: OpenAI-compatible API, Prometheus metrics, health and admin endpoints."""
