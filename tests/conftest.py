import warnings

import pytest
import torch

torch.set_num_threads(max(1, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*is treated as opaque.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
