"""dialogtrain: SFT and DPO for dialogue language models on DeepSpeed.

This package is imported by the launcher for its torch-free parts (options, errors), so it
imports nothing heavy at package level.
"""

__version__ = "0.1.0"
