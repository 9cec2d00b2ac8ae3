"""dash-fast: DASH (preemptive sampling + gradient filtering) RL for reasoning language models."""

from dash_fast.runtime.device import set_openmp_wait_policy

set_openmp_wait_policy()  # first: libgomp reads it when torch loads it (runtime/device.py says why)

from dash_fast.config import DashConfig  # noqa: E402
from dash_fast.embedded.sft import SFTConfig  # noqa: E402
from dash_fast.trainer import DashTrainer  # noqa: E402
from dash_fast.trl.trainer import GRPOConfig, GRPOTrainer  # noqa: E402

__all__ = ["DashConfig", "DashTrainer", "GRPOConfig", "GRPOTrainer", "SFTConfig"]
__version__ = "0.1.0"
