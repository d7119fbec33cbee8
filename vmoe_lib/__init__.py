"""vmoe_lib: Vision Mixture-of-Experts, reproduced in PyTorch."""
from ._version import __version__
from . import errors, models
from .models import create_model, list_models
