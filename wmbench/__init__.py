"""wmbench: sequence models inside world models, benchmarked."""
from wmbench.core.registry import (create_backbone, get_task, list_backbones, list_tasks,
                              register_backbone, register_task)

from wmbench.core.version import __version__
__all__ = ["create_backbone", "list_backbones", "register_backbone", "get_task", "list_tasks",
           "register_task", "__version__"]
