from .checkpoint import CheckpointError, save_sat_checkpoint
from .cogvlm import Cache, CogVLM, ModelInputs, RuntimeState
from .config import ALIASES, DTYPES, MODEL_CONFIGS, CrossConfig, EVAConfig, ModelConfig, get_config
from .loading import (LoadOptions, ModelNotFound, QuantConfig, build_model, default_dtype, load_model,
                      resolve_pretrained)

__all__ = ["Cache", "CheckpointError", "CogVLM", "CrossConfig", "DTYPES", "EVAConfig", "ModelConfig",
           "ModelInputs", "RuntimeState",
           "LoadOptions", "ModelNotFound", "MODEL_CONFIGS", "QuantConfig", "ALIASES", "build_model", "default_dtype",
           "get_config", "load_model", "resolve_pretrained", "save_sat_checkpoint"]
