"""The world model shared by the agent and the harnesses: Drama's world model over any backbone.

    from wmbench.world_model import WorldModel, get_preset
    wm = WorldModel(get_preset("XS", backbone="mamba2"), n_actions=18)
"""
from wmbench.world_model.config import DramaConfig, get_preset, list_presets
from wmbench.world_model.model import Imagination, WorldModel

__all__ = ["DramaConfig", "Imagination", "WorldModel", "get_preset", "list_presets"]
