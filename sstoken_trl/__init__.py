"""ssToken token selection for supervised fine-tuning, as a plug-in for TRL's SFTTrainer."""

from sstoken_trl.callback import SSTokenCallback
from sstoken_trl.collator import SSTokenCollator, pretokenize
from sstoken_trl.config import SSTokenConfig

__all__ = ["SSTokenCallback", "SSTokenCollator", "SSTokenConfig", "pretokenize"]
__version__ = "0.1.0"
