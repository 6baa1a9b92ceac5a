"""MEMOIR: lifelong model editing with a sparse residual memory (Wang et al., NeurIPS 2025)."""

from .editor import EditHyperParams, EditInputError
from .engine import EditResult, MemoirConfig, MemoirEngine, ScoredContinuation
from .frames import CHAT_FORMAT, Message, Prompt, PromptError, as_prompt, chat_prompt, edit_frames, question_frames
from .generation import GenerationOutput, GenerationRequest, SamplingParams
from .models import LoadedModel, load_model
from .state import StateMismatch

__all__ = [
    "CHAT_FORMAT",
    "Message",
    "PromptError",
    "chat_prompt",
    "edit_frames",
    "question_frames",
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
