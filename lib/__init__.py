"""Shared library for the persona-world-models studies.

One module per idea (see README): ``ghmm`` (generalized HMM maths), ``processes`` (named
processes and a registry), ``sfp`` (semi-factored processes, partitions, density matrices),
``report`` (parameter validation, atomic outputs) and ``runner`` (papermill execution).
"""
