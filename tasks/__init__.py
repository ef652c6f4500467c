"""Workloads that exercise backbones; importing this package registers the built-ins."""
from wmbench.tasks import gridworld  # noqa: F401  (registration side effects)
