"""persona_wm: Semi-Factored Processes, belief-state steering and emergent misalignment.

Subpackages, each importing only from the ones before it (``tests/unit/test_layers.py`` checks):

* ``core``      GHMM maths, SFP construction and checks, products, the process-name grammar, files
* ``analysis``  statistics and geometry (numpy/scipy/pandas/statsmodels, no torch; nothing of ours but core)
* ``processes`` process families (classic, partitioned, the EM organism): numpy only
* ``toy``       small transformers on processes: train, probe, steer, EM measures and reversal, engineering
* ``llm``       real language models: loading, forwards and caches, generation, LoRA, steering, EM, datasets
* ``plots``     figures
* ``studies``   one module per notebook (section functions, result dataclasses) and study 04's grid driver
* ``io``        params validation, outputs, the study runner, the sweep's command line, output checks
"""

import warnings

# transformers, peft and transformer_lens import tqdm's notebook-aware bars, which in a Jupyter kernel without
# ipywidgets warn "IProgress not found" on stderr (the runner prints kernel stderr on the terminal) and fall back to
# text bars. Ours are plain tqdm already; this keeps the third-party import quiet for every valid run of every study.
warnings.filterwarnings("ignore", message="IProgress not found")
