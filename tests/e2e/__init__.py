"""End-to-end tests against a real Kubernetes control plane (skipped without $KUBECONFIG)."""
