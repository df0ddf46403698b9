from .checkpoint import CheckpointError, save_sat_checkpoint
from .cogvlm import Cache, CogVLM
from .config import ALIASES, MODEL_CONFIGS, CrossConfig, EVAConfig, ModelConfig, get_config
from .loading import ModelNotFound, build_model, default_dtype, load_model, resolve_pretrained

__all__ = ["Cache", "CheckpointError", "CogVLM", "CrossConfig", "EVAConfig", "ModelConfig",
           "ModelNotFound", "MODEL_CONFIGS", "ALIASES", "build_model", "default_dtype",
           "get_config", "load_model", "resolve_pretrained", "save_sat_checkpoint"]
