"""dash-fast: DASH (preemptive sampling + gradient filtering) RL for reasoning language models."""

from dash_fast.config import DashConfig, SFTConfig
from dash_fast.trainer import DashTrainer

__all__ = ["DashConfig", "DashTrainer", "SFTConfig"]
__version__ = "0.1.0"
