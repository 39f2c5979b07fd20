import pytest
import torch

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
