"""The Python surface as torch_npu's bindings take arguments: ints in every form torch's argument parser
takes (int subclasses, numpy integers, 0-d integer tensors, __index__) and none of its refusals (bools);
bool tensors (x_active_mask) read on every torch version; tensors that are non-contiguous, explicitly on
the CPU device, requiring grad or empty. Results are checked bit for bit against the oracle; every form
torch_npu would refuse, or moedist cannot read, raises a ValidationError naming parameter, value and rule."""
import numpy as np
import pytest
import torch

import moedist
from cases import check_rank, random_case
from moedist import _moedist, _tensors

SEEDS = [0, 1, 2, 3]  # one-rank cases (W = 1, T = 0) of random configurations


class Index:
    """Not an int, but has __index__: torch's argument parser takes it as one."""

    def __init__(self, value):
        self.value = value

    def __index__(self):
        return self.value


class Subclass(int):
    pass


INT_FORMS = {
    "int subclass": Subclass,
    "numpy int64": np.int64,
    "numpy int32": np.int32,
    "numpy uint16": np.uint16,
    "numpy 0-d array": np.array,
    "0-d int64 tensor": torch.tensor,
    "0-d int32 tensor": lambda v: torch.tensor(v, dtype=torch.int32),
    "__index__": Index,
}


@pytest.mark.parametrize("form", INT_FORMS.values(), ids=INT_FORMS.keys())
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_every_int_form_torch_takes_is_taken(form, seed, job):
    case = random_case(seed, ep_world_size=1, tp=0)
    groups = moedist.new_group(job, form(0), form(1), tp_world_size=form(0), timeout_ms=form(30000))
    assert groups[0].get_hccl_comm_name(form(0)) == groups[0].name
    check_rank(0, 1, case, "torch", False, groups=groups, ints=form)


# ---- refusals of int parameters ----

@pytest.fixture
def one(job):
    ep, _ = moedist.new_group(job, 0, 1)
    return ep.name


def inputs(bs=4, h=16):
    torch.manual_seed(0)
    x = torch.randn(bs, h).to(torch.bfloat16)
    ids = torch.tensor([[i % 2, (i + 1) % 2] for i in range(bs)], dtype=torch.int32)
    return x, ids, torch.rand(bs, 2)


def dispatch_with(one, **kw):
    x, ids, w = inputs()
    args = dict(x=x, expert_ids=ids, group_ep=one, ep_world_size=1, ep_rank_id=0, moe_expert_num=2)
    return moedist.npu_moe_distribute_dispatch(**{**args, **kw})


def combine_with(one, **kw):
    x, ids, w = inputs()
    d = moedist.npu_moe_distribute_dispatch(x, ids, one, 1, 0, 2)
    args = dict(expand_x=d[0], expert_ids=ids, expand_idx=d[2], ep_send_counts=d[4], expert_scales=w, group_ep=one,
                ep_world_size=1, ep_rank_id=0, moe_expert_num=2)
    return moedist.npu_moe_distribute_combine(**{**args, **kw})


CONFIG_INTS = ["ep_world_size", "ep_rank_id", "moe_expert_num", "tp_world_size", "tp_rank_id", "expert_shard_type",
               "shared_expert_num", "shared_expert_rank_num", "global_bs"]
DISPATCH_INTS = CONFIG_INTS + ["quant_mode", "expert_token_nums_type"]
COMBINE_INTS = CONFIG_INTS + ["out_dtype", "comm_quant_mode", "group_list_type"]

NOT_INTS = {
    "bool": (True, "must be an integer, not a bool"),
    "numpy bool_": (np.bool_(False), "must be an integer, not a bool"),
    "bool tensor": (torch.tensor(True), "must be an integer, not a bool tensor"),
    "float": (2.0, "must be an integer"),
    "string": ("1", "must be an integer"),
    "None": (None, "must be an integer"),
    "1-d tensor": (torch.tensor([1]), "a tensor given for an integer must be 0-d and of an integer dtype"),
    "float tensor": (torch.tensor(1.0), "a tensor given for an integer must be 0-d and of an integer dtype"),
    "numpy float": (np.float32(1), "must be an integer"),
    "beyond int32": (2**40, "must be an integer in ["),
}


def refused(fn, parameter, value, rule):
    with pytest.raises(moedist.ValidationError) as info:
        fn()
    e = info.value
    assert (e.parameter, e.value, e.code) == (parameter, repr(value), "invalid_argument"), (e.parameter, e.value, str(e))
    assert rule in e.rule and str(e) == f"{parameter} = {value!r}: {e.rule}", str(e)


@pytest.mark.parametrize("value, rule", NOT_INTS.values(), ids=NOT_INTS.keys())
def test_what_torch_refuses_for_an_int_is_refused_by_name(one, value, rule):
    for name in DISPATCH_INTS:
        refused(lambda: dispatch_with(one, **{name: value}), name, value, rule)
    for name in COMBINE_INTS:
        refused(lambda: combine_with(one, **{name: value}), name, value, rule)


@pytest.mark.parametrize("value, rule", NOT_INTS.values(), ids=NOT_INTS.keys())
def test_group_functions_refuse_non_ints_by_name(job, value, rule):
    refused(lambda: moedist.new_group(job, value, 2), "rank", value, rule)
    refused(lambda: moedist.new_group(job, 0, value), "world_size", value, rule)
    refused(lambda: moedist.new_group(job, 0, 2, tp_world_size=value), "tp_world_size", value, rule)
    ep, _ = moedist.new_group(job, 0, 1)
    if value is not None:  # get_hccl_comm_name's rank is optional
        refused(lambda: ep.get_hccl_comm_name(value), "rank", value, rule)


# ---- bool tensors: x_active_mask ----

def view_of(t, name="x_active_mask"):
    """The view the operators read of `t`, through the package's own preparation of it."""
    obj, view_as, _ = _tensors.prepare(name, t)
    return _moedist.describe_view(obj, name, view_as)


def address_of(t):
    return t.data_ptr() if isinstance(t, torch.Tensor) else t.__array_interface__["data"][0]


BOOL_TENSORS = {
    "torch": lambda: torch.tensor([True, False, True, True, False]),
    "torch [::2]": lambda: torch.tensor([True, False, True, True, False])[::2],
    "torch 2-D transposed": lambda: torch.zeros(3, 4, dtype=torch.bool).t(),
    "torch empty": lambda: torch.zeros(0, dtype=torch.bool),
    "torch offset": lambda: torch.ones(6, dtype=torch.bool)[1:],
    "numpy": lambda: np.array([True, False, True]),
    "numpy [::2]": lambda: np.array([True, False, True, True, False])[::2],
    "numpy 2-D fortran": lambda: np.asfortranarray(np.zeros((3, 4), dtype=bool)),
    "numpy read-only": lambda: _read_only(np.ones(3, dtype=bool)),
}


def _read_only(a):
    a.setflags(write=False)
    return a


def element_strides(t):
    return tuple(t.stride()) if isinstance(t, torch.Tensor) else tuple(s // t.itemsize for s in t.strides)


@pytest.mark.parametrize("make", BOOL_TENSORS.values(), ids=BOOL_TENSORS.keys())
def test_bool_tensors_are_read_in_place_as_bools(make):
    t = make()
    view = view_of(t)
    assert view["dtype"] == "bool"
    assert view["shape"] == tuple(t.shape) and view["strides"] == element_strides(t)
    assert view["address"] == address_of(t)  # no copy


def test_a_torch_bool_tensor_given_straight_to_dlpack_is_read_or_named():
    # torch 1.13's DLPack refuses bool (the package views the bytes instead); later versions export it.
    t = torch.tensor([True, False])
    try:
        view = _moedist.describe_view(t, "x_active_mask")
    except moedist.ValidationError as e:
        assert torch.__version__.startswith("1.") and e.parameter == "x_active_mask" and "DLPack" in e.rule, str(e)
    else:
        assert view["dtype"] == "bool" and view["shape"] == (2,)


def test_only_byte_tensors_are_read_as_bools():
    with pytest.raises(moedist.ValidationError) as info:
        _moedist.describe_view(torch.zeros(3, dtype=torch.int32), "x_active_mask", _moedist.ViewAs.boolean)
    assert (info.value.parameter, info.value.value) == ("x_active_mask.dtype", "int32")


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_a_bool_mask_reaches_the_operators_validation(one, kind):
    # One entry too many: refused whether or not the operators take masks, by x_active_mask's own rules.
    mask = torch.ones(5, dtype=torch.bool) if kind == "torch" else np.ones(5, dtype=bool)
    for call in (dispatch_with, combine_with):
        with pytest.raises(moedist.ValidationError) as info:
            call(one, x_active_mask=mask)
        assert info.value.parameter.startswith("x_active_mask"), str(info.value)


# ---- tensor forms torch_npu takes ----

def explicit_cpu(t):
    return t.to(torch.device("cpu"), copy=True)


def requiring_grad(t):
    return t.detach().clone().requires_grad_() if t.is_floating_point() else t


@pytest.mark.parametrize("wrap", [None, explicit_cpu, requiring_grad], ids=["plain", "explicit cpu device", "requires grad"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "non-contiguous"])
@pytest.mark.parametrize("seed", SEEDS)
def test_tensor_forms_match_the_oracle(seed, strided, wrap, job):
    # non-contiguous: x and expand_x are every other column of a wider tensor, expert_ids, expert_scales
    # and scales transposed views of column-major memory (cases.to_tensor / to_other).
    case = random_case(seed, ep_world_size=1, tp=0)
    check_rank(0, 1, case, "torch", strided, groups=moedist.new_group(job, 0, 1), wrap=wrap)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_zero_tokens_match_the_oracle(seed, kind, job):
    case = random_case(seed, ep_world_size=1, tp=0)
    rank = case["ranks"][0]
    for name in ("x", "expert_ids", "expert_scales"):
        if name in rank:
            rank[name] = rank[name][:0]
    rank["combine_x"] = rank["combine_x"][:0]
    if case["global_bs"] == 0:
        case["global_bs"] = 1
    check_rank(0, 1, case, kind, False, groups=moedist.new_group(job, 0, 1))


# ---- forms torch_npu refuses, or moedist cannot read: named ----

# torch 2.13 deprecates making quantized tensors; the test still needs one, to see it refused.
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_tensor_forms_that_are_refused_are_named(one):
    x, ids, w = inputs()
    bad = [
        (dict(x=x.to("meta")), "x.device", "meta", "must be the CPU"),
        (dict(expert_ids=ids.to("meta")), "expert_ids.device", "meta", "must be the CPU"),
        (dict(x=x.double()), "x.dtype", "float64", "must be bfloat16, float16"),
        (dict(x=x.float()), "x.dtype", "float32", "must be bfloat16 or float16"),
        (dict(expert_ids=ids.long()), "expert_ids.dtype", "int64", "must be int32"),
        (dict(x=x.tolist()), "x", "list", "must be a torch tensor, a numpy array or None"),
        (dict(expert_ids=ids.tolist()), "expert_ids", "list", "must be a torch tensor, a numpy array or None"),
        (dict(x=x.float().to_sparse()), "x.layout", "torch.sparse_coo", "must be torch.strided"),
        (dict(x=torch.quantize_per_tensor(x.float(), 0.1, 0, torch.qint8)), "x", "Tensor", "DLPack"),
        (dict(x=x.reshape(2, 2, 16)), "x.dim()", "3", "must be 1 or 2"),
        (dict(x=x.float().numpy().astype(">f2")), "x.dtype", ">f2", "byte order"),
        (dict(x=x.float().numpy().astype(np.float16)[::-1]), "x.strides", "-32 bytes", "non-negative"),
        (dict(x=torch.zeros(4, 16, dtype=torch.complex64)), "x.dtype", "complex64", "must be"),
    ]
    for kw, parameter, value, rule in bad:
        with pytest.raises(moedist.ValidationError) as info:
            dispatch_with(one, **kw)
        e = info.value
        assert (e.parameter, e.value) == (parameter, value) and rule in e.rule, (kw, str(e))
