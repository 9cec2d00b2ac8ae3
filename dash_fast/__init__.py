"""dash-fast: DASH (preemptive sampling + gradient filtering) RL for reasoning language models."""

from dash_fast.config import DashConfig, SFTConfig
from dash_fast.trainer import DashTrainer
from dash_fast.trl_compat import GRPOConfig, GRPOTrainer

__all__ = ["DashConfig", "DashTrainer", "GRPOConfig", "GRPOTrainer", "SFTConfig"]
__version__ = "0.1.0"
