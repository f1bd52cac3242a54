"""circuits: automated circuit discovery for Hugging Face transformer language models."""

from .engine import PatchedOutput, PrefixCache, mean_values, patched_forward, patching_values, source_outputs
from .graph import Graph
from .model import Model, load_model
from .task import Baseline, Task, TokenizedTask

__version__ = "0.1.0"

__all__ = [
    "Baseline",
    "Graph",
    "Model",
    "PatchedOutput",
    "PrefixCache",
    "load_model",
    "mean_values",
    "patched_forward",
    "patching_values",
    "source_outputs",
    "Task",
    "TokenizedTask",
]
