"""fedlora: differentially private federated fine-tuning with LoRA adapters."""

from fedlora.config import ExperimentConfig, build_config, load_config

__all__ = ["ExperimentConfig", "build_config", "load_config"]
__version__ = "0.1.0"
