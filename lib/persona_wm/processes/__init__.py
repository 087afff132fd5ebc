"""Process families (numpy only); ``get_process(name)`` builds any process from its name.

Importing this package registers every family (:mod:`~persona_wm.processes.classic`: ``z1r``,
``mess3``; :mod:`~persona_wm.processes.partitioned`: ``pp_z1r``, ``pp_mess3``, ``semi_factored`` and
the wrappers ``restricted``, ``leaky``, ``sfp``; :mod:`~persona_wm.processes.em`: ``em``; :mod:`~persona_wm.processes.em_seq`: ``em_seq``) with
:mod:`persona_wm.core.registry`, whose module docstring gives the name grammar and how to add a process.
"""

from persona_wm.core.registry import PRODUCT_SEPARATOR, REGISTRY, canonical_name, families, get_process, process_name
from persona_wm.core.sfp import product
from persona_wm.processes import em, em_seq
from persona_wm.processes.classic import mess3, z1r
from persona_wm.processes.partitioned import pp_mess3, pp_z1r, semi_factored_z1r

__all__ = ["get_process", "REGISTRY", "families", "process_name", "canonical_name", "PRODUCT_SEPARATOR", "product",
           "z1r", "mess3", "pp_z1r", "pp_mess3", "semi_factored_z1r", "em", "em_seq"]
