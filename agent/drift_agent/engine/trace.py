"""Debug trace of scheduling decisions: one JSON object per line (predicted vs actual latency, split, batch)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any


class DecisionTrace:
    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._file = self.path.open("a", buffering=1) if self.path else None

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def record(self, **fields: Any) -> None:
        if self._file is None:
            return
        line = json.dumps(fields, default=str)
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
