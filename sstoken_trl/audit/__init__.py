"""The audit: which samples of a data set, or of a training run, the selection's own signals find suspect.

`signals` computes the per-token suspicion of each signal, `scan` runs one pass over a data set and ranks its
samples, `run_record` records what the selection left out during training, `page` writes the ranked page and the
JSONL, and `cli` is the `sstoken-audit` command. docs/audit.md says what each signal finds and how well.
"""

from sstoken_trl.audit.run_record import AuditRecorder
from sstoken_trl.audit.signals import SIGNALS

__all__ = ["SIGNALS", "AuditRecorder"]
