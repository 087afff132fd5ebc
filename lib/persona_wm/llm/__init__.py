"""persona_wm.llm"""

import warnings

# peft and transformers import tqdm.auto, which in a Jupyter kernel without ipywidgets warns "IProgress not found"
# on stderr (the runner prints kernel stderr on the terminal) and falls back to text bars. Ours are plain tqdm
# already; this keeps the third-party import quiet for every valid run.
warnings.filterwarnings("ignore", message="IProgress not found")
