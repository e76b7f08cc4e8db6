"""What a person running a launcher sees: logging set up once, one ``error:`` line per mistake, and
no third-party notices they cannot act on.

`run` wraps a launcher's body: a `ValueError` (every check of input, config or world raises one)
or a `RunError` becomes one ``error: ...`` line per failing condition on rank 0 and exit status 2
on every rank; anything else is a bug and keeps its traceback. ``--debug`` (or ``LSTS_DEBUG=1``)
keeps the traceback of user errors too.

`setup_logging` configures the ``lsts`` logger: rank 0 only unless every rank is asked for, each
line written through ``tqdm.write`` so that it lands above a progress bar on a terminal and as a
plain line in a file. The rank comes from torchrun's ``RANK`` (0 for a plain ``python``).

Pure Python at import (no torch), so that a launcher's ``--help`` stays instant.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable

from tqdm import tqdm

log = logging.getLogger("lsts")

EXIT_USER_ERROR = 2


class RunError(RuntimeError):
    """A run stopped for a reason its user can fix (not a bug): reported like a `ValueError`."""


def launch_rank() -> int:
    """This process's global rank as torchrun set it; 0 for a plain ``python`` launch."""
    return int(os.environ.get("RANK", "0"))


def launch_world_size() -> int:
    """The number of ranks torchrun launched; 1 for a plain ``python`` launch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def error_lines(error: BaseException) -> list[str]:
    """``error: ...`` per failing condition (an `InvalidConfig` lists several); a message's further
    lines follow indented."""
    lines = []
    for problem in getattr(error, "problems", None) or [str(error)]:
        first, *rest = problem.strip().splitlines() or [type(error).__name__]
        lines += [f"error: {first}", *(f"  {line.strip()}" for line in rest if line.strip())]
    return lines


def run(body: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Call ``body(argv)``; a user error exits with status 2 after rank 0 printed `error_lines`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("LSTS_DEBUG", "0") not in ("", "0")
    try:
        body(argv)
    except (ValueError, RunError) as e:
        if debug:
            raise
        if launch_rank() == 0:
            sys.stderr.write("\n".join(error_lines(e)) + "\n")
            sys.stderr.flush()
        else:
            # Every rank raised the same error; torchrun stops the others as soon as one exits, so
            # rank 0 gets a moment to print it first.
            time.sleep(1.0)
        raise SystemExit(EXIT_USER_ERROR) from None


class _TqdmHandler(logging.Handler):
    """Lines through ``tqdm.write``: above an active bar, plain otherwise."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(all_ranks: bool = False) -> None:
    """Configure the ``lsts`` logger for a launcher (idempotent): INFO lines from rank 0, or from
    every rank with the rank in the prefix; errors only elsewhere."""
    rank = launch_rank()
    who = f"lsts r{rank}" if all_ranks else "lsts"
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter(f"[{who} %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    for old in [h for h in log.handlers if isinstance(h, _TqdmHandler)]:
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(logging.INFO if all_ranks or rank == 0 else logging.ERROR)
    log.propagate = False
    quiet_third_party()


class _Formatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        if record.levelno >= logging.WARNING:
            return text.replace("] ", f"] {record.levelname.lower()}: ", 1)
        return text


def _not_the_cpu_fallback_notice(record: logging.LogRecord) -> bool:
    # DeepSpeed announces on every import without a GPU that it falls back to the CPU accelerator:
    # on a CPU run that is the intent, and the user has nothing to change.
    return not record.getMessage().startswith("Setting accelerator to CPU")


def quiet_third_party() -> None:
    """Filter, by exact message, third-party warnings that a user of lsts cannot act on; no
    Hugging Face progress bars where stderr is not a terminal. Call before importing them."""
    # peft probes transformers' deprecated `is_gradient_checkpointing` alias in get_peft_model.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning, module="transformers"
    )
    # DeepSpeed's ZeRO gathers with torch's deprecated name for all_gather_single.
    warnings.filterwarnings(
        "ignore",
        message="`torch.distributed.all_gather_into_tensor` is deprecated",
        category=FutureWarning,
        module="torch.distributed",
    )
    deepspeed = logging.getLogger("DeepSpeed")  # the logger DeepSpeed creates by this name on import
    if _not_the_cpu_fallback_notice not in deepspeed.filters:
        deepspeed.addFilter(_not_the_cpu_fallback_notice)
    if not sys.stderr.isatty():
        # Hugging Face's bars (loading and writing weights) redraw with carriage returns: in a log
        # file each becomes one long line. Read by transformers when it is first imported.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


__all__ = ["RunError", "error_lines", "launch_rank", "launch_world_size", "quiet_third_party", "run", "setup_logging"]
