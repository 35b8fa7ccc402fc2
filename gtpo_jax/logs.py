"""Logging for every command: our handler on the root logger, one flushed line per record.

Importing `orbax.checkpoint` (through absl) puts a handler on the root logger first, which would
make `logging.basicConfig` a no-op and leave the level at WARNING: resume, evaluation and export
lines would vanish. `setup_logging` therefore replaces the root handlers with its own, whatever
was imported before. Records go to stdout through a StreamHandler, which flushes after every
record, so that a log file written under nohup or a batch scheduler grows while the run goes on.

Library noise that says nothing about the run is dropped by message (`install_noise_filters`,
done when `gtpo_jax` is imported, before transformers can print its import-time notice).
Only the standard library and tqdm are imported here: `gtpo_jax/__init__.py` imports this module.
"""

from __future__ import annotations

import logging
import sys
import warnings

from tqdm import tqdm

log = logging.getLogger("gtpo_jax")

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# (logger name, message fragment) of notices that are expected and harmless in this project.
NOISE = (
    # transformers at import time when torch is absent (a JAX project needs no torch).
    ("transformers", "PyTorch was not found"),
    # AutoConfig reading an SDAR config.json (model_type "sdar") into the generic config class.
    ("transformers.configuration_utils", "to instantiate a model of type"),
    # Orbax (through absl) each time a read-only manager opens a checkpoint directory for loading.
    ("absl", "is read only"),
    ("absl", "Given directory is read only"),
)
NOISY_LIBRARIES = ("absl", "jax._src", "orbax", "httpx", "urllib3", "filelock", "huggingface_hub")


class _DropMessages(logging.Filter):
    def __init__(self, fragments: list[str]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


class _OurHandler(logging.StreamHandler):
    """Writes through `tqdm.write` (so that a progress bar on the terminal is redrawn below the
    line instead of being cut by it) and flushes every record."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging must never kill the run
            self.handleError(record)


def install_noise_filters() -> None:
    """Attach the message filters to the loggers that emit the notices (loggers are created on
    first use, so this works before the libraries are imported) and silence the FutureWarning
    transformers raises when a config.json still says `rope_scaling`."""
    by_logger: dict[str, list[str]] = {}
    for name, fragment in NOISE:
        by_logger.setdefault(name, []).append(fragment)
    for name, fragments in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
    warnings.filterwarnings("ignore", message=r".*`rope_scaling` is deprecated", category=FutureWarning)


def setup_logging(level: int = logging.INFO, *, process_index: int = 0) -> None:
    """Root logger: our stdout handler only, at `level`; libraries at WARNING; processes other
    than 0 (which run the same loop) only report warnings."""
    install_noise_filters()
    root = logging.getLogger()
    for handler in list(root.handlers):
        # The plain stream handler basicConfig or absl put there; test harnesses' capturing
        # handlers (subclasses) stay.
        if type(handler) is logging.StreamHandler or type(handler).__name__ == "ABSLHandler":
            root.removeHandler(handler)
    if not any(isinstance(h, _OurHandler) for h in root.handlers):
        handler = _OurHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    log.setLevel(logging.NOTSET if process_index == 0 else logging.WARNING)
