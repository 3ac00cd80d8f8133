"""Tasks: data + model + metric. Importing this package registers the built-in tasks."""

from fedlora.tasks import causal_lm, image, qa, text  # noqa: F401  (register the built-in tasks)
from fedlora.tasks.base import ExampleSet, Task, available_tasks, build_task, majority_rate

__all__ = ["ExampleSet", "Task", "available_tasks", "build_task", "majority_rate"]
