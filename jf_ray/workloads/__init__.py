"""The embedded workloads: ``code`` (generated Python tasks, executed), ``math`` (generated word problems)
and ``stdlib`` (functions of the standard library, a language-modelling set scored by loss); for pretrained
instruct models, ``wordmath`` (word problems in plain English); and ``humaneval``, a test set.

Each has a ``train`` split (base-model pretraining and post-training prompts) and a ``heldout`` split that
no training data ever comes from. :func:`load_examples` draws either; :func:`write_examples` exports JSONL.
"""

from jf_ray.workloads.common import SPLITS, Example, read_examples, write_examples
from jf_ray.workloads.load import load_examples
from jf_ray.workloads.tasks import ALL_TASKS as TASKS

__all__ = ["SPLITS", "TASKS", "Example", "load_examples", "read_examples", "write_examples"]
