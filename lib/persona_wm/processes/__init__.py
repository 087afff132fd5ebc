"""Process families (numpy only); ``get_process(name)`` builds any process from its name."""

from persona_wm.processes.catalog import REGISTRY, get_process

__all__ = ["REGISTRY", "get_process"]
