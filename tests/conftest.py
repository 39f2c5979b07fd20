import os

import torch

# Triton kernels run on the CPU interpreter when there is no GPU; the flag must be set before
# triton is first imported anywhere in the process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from rewriter import capture


@pytest.fixture(scope="session")
def captured():
    """name -> (case, model, captured GraphModule), built once per session."""
    from tests._zoo import CASES

    cache: dict = {}
    by_name = {c.name: c for c in CASES}

    def get(name: str):
        if name not in cache:
            case = by_name[name]
            model = case.build()
            gm = capture(model, case.inputs(model, 2, 7))
            cache[name] = (case, model, gm)
        return cache[name]

    return get


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
