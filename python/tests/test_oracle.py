"""The Python operators against the reference oracle, bit for bit: random configurations (shared
experts, TP, both quant modes, both dtypes, smooth scales, uneven BS, comm quant), every rank a process,
with torch and numpy inputs, contiguous and not."""
import pytest

from cases import check_rank, random_case
from conftest import new_job, run_ranks


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("seed", range(12))
def test_random_cases_match_the_oracle(seed, kind, strided):
    case = random_case(1000 * seed + (7 if strided else 0) + (1 if kind == "numpy" else 0))
    n = case["ep_world_size"] * max(case["tp_world_size"], 1)
    run_ranks(n, check_rank, case, kind, strided, new_job())
