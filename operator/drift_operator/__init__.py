"""Drift's Kubernetes operator: the LLMService CRD turned into agent Deployments and an SLO feedback loop.

`kopf run -m drift_operator` imports this package with kopf already loaded, and that is when the handlers
get registered. Other importers (the `drift` CLI, tests of the pure modules) do not pay for kopf; they
import `drift_operator.handlers` explicitly when they want the handlers.
"""

import sys

__version__ = "0.1.0"

if "kopf" in sys.modules:
    from . import handlers  # noqa: F401  (registers the kopf handlers)
