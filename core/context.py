"""What travels with a model through a pipeline: calibration data, seed, report sink, switches.

Passes read calibration data from ``ctx.calib`` (None when the user gave none; wrap sweeps in
``ctx.track(...)`` for a progress bar), draw random
numbers only from ``ctx.rng(...)`` (seeded from ``ctx.seed`` and a label, so a run is
reproducible byte for byte), and write what they measured to ``ctx.note(...)`` / warnings to
``ctx.warn(...)``; both land in the report of the pass being run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import numpy as np

from lowbit.core.calib import Calibration


@dataclasses.dataclass
class PassRecord:
    """What the report keeps about one pass run."""

    name: str
    pipeline: str
    preserves: str
    changed: bool = False
    seconds: float = 0.0
    verify_seconds: float = 0.0
    #: error added by this pass, measured against the model before it (None: not measured)
    error: dict[str, float] | None = None
    #: error of the model after this pass against the original input model
    total_error: dict[str, float] | None = None
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Report:
    """The run's report: per-pass records plus whatever the caller adds (sizes, accuracy…)."""

    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "info": self.info,
            "passes": [dataclasses.asdict(p) for p in self.passes],
            "warnings": self.warnings,
        }


@dataclasses.dataclass
class Context:
    calib: Calibration | None = None
    seed: int = 0
    report: Report = dataclasses.field(default_factory=Report)
    #: compare outputs after every pass (off: structure checks only, for huge models)
    verify: bool = True
    #: number of samples the verifier runs through the model after every pass
    verify_samples: int = 8
    #: show progress bars (the CLI turns them off for --json and non-terminals)
    progress: bool = True
    current: PassRecord | None = None
    #: the model as the pipeline received it, kept only when a pass asks for it
    #: (``Pass.wants_input_model``: ``finetune`` distils it into the compressed model)
    input_model: Any = None

    def rng(self, label: str) -> np.random.Generator:
        """A generator seeded from the run's seed and ``label`` (e.g. the pass and node name)."""
        digest = hashlib.sha256(f"{self.seed}:{label}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def track(self, iterable, description: str, total: int | None = None):
        """``iterable`` with a progress bar on stderr (calibration sweeps, long layer loops);
        plain ``iterable`` when progress is off."""
        if not self.progress:
            return iterable
        import sys

        from tqdm import tqdm

        return tqdm(iterable, desc=description, total=total, file=sys.stderr, leave=False, unit="batch")

    def note(self, key: str, value: Any) -> None:
        if self.current is not None:
            self.current.notes[key] = value
        else:
            self.report.info[key] = value

    def warn(self, message: str) -> None:
        (self.current.warnings if self.current is not None else self.report.warnings).append(message)
