"""One module per study notebook: the section functions it calls and the frozen dataclasses its results live in;
and study 04's grid driver outside the notebook, :mod:`persona_wm.studies.persona_engineering_sweep`.

A notebook is prose and calls; everything it computes comes from here (or from the layers below),
and its ``metrics.json`` is written from a result dataclass's ``metrics()``.
"""
