"""Graph passes: each module holds one transformation ``GraphModule -> PassResult``."""

from .cleanup import eliminate_dead_code, remove_identity_ops

__all__ = ["eliminate_dead_code", "remove_identity_ops"]
