"""circuits: automated circuit discovery for Hugging Face transformer language models.

The user API, in the order of a discovery::

    model = circuits.load_model("smollm2-135m")             # Model (and its Graph); any HF id or directory
    task = circuits.tasks.get("ioi", model.tokenizer)        # or circuits.Task(name, clean, corrupted, ...)
    scores = circuits.attribute(model, task)                 # Scores: one per edge
    circuit = scores.most_helpful(200)                       # Circuit; or circuits.acdc(model, task, ...)
    circuit = circuits.learn_circuit(model, task, "edge-pruning", target_edges=200)  # or method="ugs"
    circuits.evaluate(model, task, circuit).faithfulness     # faithfulness_curve, roc_auc, overlap
    circuits.patched_forward(model, ids, mask, edge_mask)    # the engine itself

Bad input raises ``circuits.CircuitsError`` (a ``ValueError``). Everything else (engine internals,
file formats, figures, the ground-truth models) is importable from its module: ``circuits.engine``,
``circuits.export``, ``circuits.plot``, ``circuits.ground_truth``, ... Heavy libraries (pandas,
matplotlib, networkx, transformers) load on first use.
"""

from . import tasks
from .circuit import Circuit, Scores
from .engine import patched_forward
from .errors import CircuitsError
from .evaluate import evaluate, faithfulness_curve, overlap, roc_auc
from .graph import Graph
from .methods import acdc, attribute
from .methods.learn import learn_circuit
from .model import Model, load_model
from .task import Task
from .version import __version__

__all__ = [
    "load_model",
    "Model",
    "Graph",
    "Task",
    "tasks",
    "attribute",
    "acdc",
    "learn_circuit",
    "Scores",
    "Circuit",
    "evaluate",
    "faithfulness_curve",
    "roc_auc",
    "overlap",
    "patched_forward",
    "CircuitsError",
    "__version__",
]
