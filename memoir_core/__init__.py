"""MEMOIR: lifelong model editing with a sparse residual memory (Wang et al., NeurIPS 2025)."""

from .editor import EditHyperParams, EditInputError
from .engine import EditResult, MemoirConfig, MemoirEngine, Prompt, ScoredContinuation, as_prompt
from .generation import GenerationOutput, GenerationRequest, SamplingParams
from .models import LoadedModel, load_model
from .state import StateMismatch

__all__ = [
    "EditHyperParams",
    "EditInputError",
    "EditResult",
    "GenerationOutput",
    "GenerationRequest",
    "LoadedModel",
    "MemoirConfig",
    "MemoirEngine",
    "Prompt",
    "as_prompt",
    "SamplingParams",
    "ScoredContinuation",
    "StateMismatch",
    "load_model",
]
