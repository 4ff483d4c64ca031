"""ssToken token selection for supervised fine-tuning, as a plug-in for TRL's SFTTrainer."""

import sstoken_trl.notices  # noqa: F401  (first: it filters notices printed while PEFT is imported)

# isort: split
from sstoken_trl.config import SSTokenConfig
from sstoken_trl.data.collator import SSTokenCollator, pretokenize
from sstoken_trl.integration.callback import SSTokenCallback

__all__ = ["SSTokenCallback", "SSTokenCollator", "SSTokenConfig", "pretokenize"]
__version__ = "0.1.0"
