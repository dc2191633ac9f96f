import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test models are tiny: one intra-op thread is as fast and never oversubscribes a loaded machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


import pytest  # noqa: E402 - after the environment above, which torch reads at import
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Even when the caller's OMP_NUM_THREADS says otherwise: busy cores make OpenMP threads spin."""
    torch.set_num_threads(1)
