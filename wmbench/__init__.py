"""wmbench: sequence models inside world models, benchmarked."""
from wmbench.registry import (create_backbone, get_task, list_backbones, list_tasks,
                              register_backbone, register_task)

__version__ = "0.1.0"
__all__ = ["create_backbone", "list_backbones", "register_backbone", "get_task", "list_tasks",
           "register_task", "__version__"]
