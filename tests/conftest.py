import os

# One thread per process: the suite's subprocesses (examples, DDP workers) and the runner
# would otherwise oversubscribe the cores, and OpenMP's spinning makes that very slow.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# se3-transformer-pytorch caches its basis under ~/.cache.equivariant_attention unless
# CLEAR_CACHE is set when it is imported: the tests keep it in memory and write nothing.
os.environ.setdefault("CLEAR_CACHE", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(1)

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
