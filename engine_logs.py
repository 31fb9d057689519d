"""Expected engine warnings, filtered at their loggers so that the console shows what matters.

Each entry names the logger, a piece of the message and why it is expected. A record that matches is
dropped; the first one dropped in a process is replaced by one line saying what is filtered. Anything
else on those loggers, and every other logger, still shows.

- vLLM warns "Failed to load weights" at every weight sync for each layer that received no tensor: the
  frozen sub-models (a frozen vision tower) are not pushed and keep their weights; the parity check
  (cluster.sync_parity_check) verifies what was pushed.
- vLLM's CPU build: Triton without a CPU backend, torch finding no CUDA runtime, and torch's deprecated
  ``reduce_op`` touched by vLLM's Triton dispatcher (a FutureWarning), once per engine start.
"""
from __future__ import annotations

import logging
import warnings

EXPECTED = [
    ("vllm.model_executor.model_loader.reload.layerwise", "Failed to load weights",
     "layers a weight sync does not push (frozen sub-models) keep their weights"),
    ("vllm.triton_utils.importing", "doesn't include CPU backend", "vLLM's CPU build"),
    ("torch.utils.cpp_extension", "No CUDA runtime is found", "vLLM's CPU build"),
]
log = logging.getLogger(__name__)


class ExpectedWarnings(logging.Filter):
    def __init__(self, logger_name: str, text: str, why: str):
        super().__init__()
        self.logger_name, self.text, self.why = logger_name, text, why
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        self.dropped += 1
        if self.dropped == 1:
            log.warning("filtering expected engine warnings %r (logger %s): %s", self.text, self.logger_name, self.why)
        return False


def filter_expected_engine_warnings() -> list[ExpectedWarnings]:
    """Installs the filters in this process (once); returns them. Call before vLLM is imported."""
    installed = []
    for name, text, why in EXPECTED:
        logger = logging.getLogger(name)
        existing = [f for f in logger.filters if isinstance(f, ExpectedWarnings)]
        if not existing:
            existing = [ExpectedWarnings(name, text, why)]
            logger.addFilter(existing[0])
        installed += existing
    warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op.*", category=FutureWarning)
    return installed
