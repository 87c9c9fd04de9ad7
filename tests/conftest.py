import os

import torch

# One intra-op thread, here and in every subprocess a test starts (they inherit the environment):
# the bitwise checks (determinism, kill -9 / SIGTERM then --resume, adapters off == teacher) hold
# at a fixed thread count of 1. Measured: at 2 threads on this CPU a resumed process's weights
# differed from the uninterrupted run's (tests/test_faults.py), as did two bitwise comparisons of
# tests/test_guidance.py; docs/faults.md says so.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Nothing may come from a model hub during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
