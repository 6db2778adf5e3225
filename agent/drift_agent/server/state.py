"""What every route shares: the engine, the settings, the metrics and the in-flight requests."""

from __future__ import annotations

import time
from typing import Any

from ..engine.async_engine import AsyncLLMEngine
from ..engine.outputs import RequestOutput
from .drain import InFlight
from .errors import APIError
from .generation import Choice, GenerationGroup, times_of
from .metrics import ServerMetrics
from .settings import ServerSettings


class ServerState:
    def __init__(
        self, async_engine: AsyncLLMEngine, settings: ServerSettings, metrics: ServerMetrics
    ) -> None:
        self.async_engine = async_engine
        self.settings = settings
        self.metrics = metrics
        self.inflight = InFlight()
        self.started = time.time()

    @property
    def engine(self) -> Any:
        return self.async_engine.engine

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested not in (self.model_name, self.engine.config.model):
            raise APIError(
                404, f"The model `{requested}` does not exist.", param="model", code="model_not_found"
            )

    def check_accepting(self) -> None:
        if self.inflight.draining:
            raise APIError(
                503,
                "server is shutting down; retry on another replica",
                code="draining",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )

    def new_group(self) -> GenerationGroup:
        return GenerationGroup(self.async_engine, self._on_choice_end)

    def _on_choice_end(self, choice: Choice, final: RequestOutput | None, aborted: bool, now: float) -> None:
        last = final or choice.last
        n_out = last.num_output_tokens if last is not None else 0
        self.metrics.on_request_end(final, choice.slo, times_of(choice), n_out, aborted, now)
