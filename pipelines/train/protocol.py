"""What the training job, its distributed launcher and the daemon agree on: errors, exit codes, outcome.

Standard library only: the daemon imports this at startup and must not load torch to do so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


class TrainingError(RuntimeError):
    """A run cannot continue; the message says why (recorded as the run's failure reason)."""


class Interrupted(RuntimeError):
    """The run was asked to stop; its latest state is checkpointed and it resumes from there."""


class DistributedError(RuntimeError):
    """The distributed setup is inconsistent; the message says what to change."""


EXIT_INTERRUPTED = 75  # what `python -m pipelines.train` exits with after a checkpointed stop (EX_TEMPFAIL)
INTERRUPTED_MARKER = "interrupted.json"   # rank 0 writes it when a torchrun run checkpointed and stopped


@dataclass
class TrainOutcome:
    """What a finished run reports (also written to ``RUN_DIR/result.json``)."""

    adapter_dir: str
    status: str                      # "completed" | "budget" (wall-clock budget spent, adapter still written)
    steps: int
    total_steps: int
    loss_first: float | None
    loss_last: float | None
    tokens: int                      # real (non-padding) tokens processed, this process and before a resume
    seconds: float
    tokens_per_second: float
    resumed_from_step: int = 0
    micro_batch_splits: int = 1      # >1 after an out-of-memory retry
    gradient_checkpointing: bool = False
    examples: int = 0
    sequences: int = 0
    parent_adapter: str | None = None
    speed: dict = field(default_factory=dict)   # the SpeedPlan this run used (attention, compile, autocast, ...)
    history: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("history")
        return d
