"""circuits: automated circuit discovery for Hugging Face transformer language models."""

from .circuit import Circuit, Scores
from .engine import PatchedOutput, PrefixCache, mean_values, patched_forward, patching_values, source_outputs
from .evaluate import MIB_FRACTIONS, Curve, Evaluation, evaluate, faithfulness_curve, overlap, roc_auc
from .graph import Graph
from .ground_truth.tracr import from_tracr
from .methods import acdc, attribute
from .model import Model, load_model
from .native import NativeConfig, NativeTransformer
from .task import Baseline, Task, TokenizedTask

__version__ = "0.1.0"

__all__ = [
    "MIB_FRACTIONS",
    "Curve",
    "Evaluation",
    "evaluate",
    "faithfulness_curve",
    "from_tracr",
    "overlap",
    "roc_auc",
    "Baseline",
    "Circuit",
    "Scores",
    "acdc",
    "attribute",
    "Graph",
    "Model",
    "NativeConfig",
    "NativeTransformer",
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
