"""costmodel: per-operator vLLM step-time model on benchmarked kernel tables, in JAX."""
from .calibration import load_calibration
from .errors import InputError
from .hardware import GPU, GPUS, get_gpu
from .model import ModelConfig, load_model
from .params import Params, PRIORS
from .step import Step, pack_steps, setup, step_time, make_step_fn
from .tables import Tables, load_tables

__all__ = ["InputError", "GPU", "GPUS", "get_gpu", "ModelConfig", "load_model", "Params", "PRIORS", "Step",
           "pack_steps", "setup", "step_time", "make_step_fn", "Tables", "load_tables", "load_calibration"]
__version__ = "0.1.0"
