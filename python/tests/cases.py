"""Random cases, the oracle comparison of one rank, and conversions between tensor kinds; shared by the
tests and by rank_script.py (ranks started by moedist launch or mpirun)."""
import numpy as np
import torch

import moedist
from moedist import _moedist


# ---- tensors of either kind, from and to bit patterns ----

def to_tensor(bits, dtype, kind, strided=False):
    """A 16-bit float tensor of the given kind ('torch' or 'numpy') from uint16 bit patterns; strided: a
    non-contiguous view (every other column of a twice as wide buffer)."""
    if strided:
        wide = np.zeros((bits.shape[0], bits.shape[1] * 2), dtype=np.uint16)
        wide[:, ::2] = bits
        view = wide[:, ::2]
    else:
        view = np.ascontiguousarray(bits)
    if kind == "numpy":
        return moedist.bfloat16(view) if dtype == "bfloat16" else view.view(np.float16)
    t = torch.from_numpy((wide if strided else view.copy()).view(np.int16))
    t = t.view(torch.bfloat16) if dtype == "bfloat16" else t.view(torch.float16)
    return t[:, ::2] if strided else t


def to_other(array, kind, strided=False):
    """An int32 / fp32 array as the given kind; strided: a column-major copy (non-contiguous for 2-D)."""
    if array is None:
        return None
    a = np.asfortranarray(array) if strided and array.ndim == 2 else np.ascontiguousarray(array)
    return torch.from_numpy(a) if kind == "torch" else a


def bits_of(t):
    """uint16 bit patterns (16-bit floats) or the plain array (other dtypes) of a result."""
    if isinstance(t, torch.Tensor):
        if t.dtype in (torch.bfloat16, torch.float16):
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()
    if t.dtype == np.float16:
        return t.view(np.uint16)
    return t


# ---- random cases and the oracle ----

def random_half_bits(rng, shape, dtype, scale=1.0):
    values = (rng.standard_normal(shape) * scale).astype(np.float32)
    if dtype == "float16":
        return values.astype(np.float16).view(np.uint16)
    bits = values.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def random_case(seed, ep_world_size=None, tp=None, data_seed=None, masks=False, h=None, max_bs=None):
    """A random valid configuration and every rank's inputs (dict for _moedist.oracle_run, plus config).
    ep_world_size / tp fix W / T, h / max_bs the row width and the largest BS (the rest stays random);
    data_seed draws the inputs from another seed, for groups of one configuration with different data;
    masks gives every rank that may have one an x_active_mask (a random number of active tokens first,
    padding after, whose expert ids are garbage no dispatch may read), as an inference engine pads a batch.
    Without them a seed gives the case it always has."""
    rng = np.random.default_rng(seed)
    t = int(rng.choice([0, 1, 2]))
    w = int(rng.integers(1, 5))
    t = t if tp is None else tp
    w = w if ep_world_size is None else ep_world_size
    divisors = [s for s in range(1, w) if w % s == 0]
    s = int(rng.choice(divisors)) if divisors and rng.random() < 0.4 else 0
    local = 1 if t == 2 else int(rng.integers(1, 4))
    e = (w - s) * local
    k = int(rng.integers(1, min(e, 6) + 1))
    drawn_h = int(rng.integers(1, 96))  # drawn even when h is given: the later draws stay the seed's
    h = drawn_h if h is None else h
    dtype = str(rng.choice(["bfloat16", "float16"]))
    quant = int(rng.choice([0, 2]))
    uneven = rng.random() < 0.4
    drawn_bs = int(rng.integers(1, 6))
    max_bs = drawn_bs if max_bs is None else max_bs
    global_bs = max_bs * w if uneven or rng.random() < 0.5 else 0
    with_scales, with_weights = quant == 2 and rng.random() < 0.6, rng.random() < 0.7  # every rank alike
    rng = rng if data_seed is None else np.random.default_rng([seed, data_seed])
    ranks = []
    for g in range(w * max(t, 1)):
        bs = int(rng.integers(0, max_bs + 1)) if global_bs and uneven else max_bs
        ids = np.stack([rng.permutation(e)[:k] for _ in range(bs)]).astype(np.int32) if bs else np.zeros((0, k), np.int32)
        rank = {"x": random_half_bits(rng, (bs, h), dtype), "expert_ids": ids}
        if with_scales:
            rank["scales"] = rng.uniform(0.25, 4.0, (e + (1 if s else 0), h)).astype(np.float32)
        if with_weights:
            rank["expert_scales"] = rng.uniform(-1, 1, (bs, k)).astype(np.float32)
        ranks.append(rank)
    case = {"ep_world_size": w, "tp_world_size": t, "moe_expert_num": e, "shared_expert_rank_num": s, "global_bs": global_bs,
            "quant_mode": quant, "expert_token_nums_type": int(rng.integers(0, 2)),
            "comm_quant_mode": 2 if t != 2 and rng.random() < 0.3 else 0, "dtype": dtype, "h": h, "k": k, "ranks": ranks}
    if masks:
        for rank in ranks:
            bs = rank["x"].shape[0]
            if global_bs and global_bs > bs * w:
                continue  # a rank below global_bs / W must have every token active (V2 §3.9)
            active = int(rng.integers(0, bs + 1))
            rank["x_active_mask"] = np.arange(bs) < active
            rank["expert_ids"][active:] = -1
    # Expert outputs: random rows, one per row each rank will hold.
    layout = _moedist.oracle_run(case)
    for g, rank in enumerate(ranks):
        rank["combine_x"] = random_half_bits(rng, (layout[g]["valid_rows"], h), dtype, 2.0)
    return case


def seeds_for(world, want, tp=None):
    """Seeds (of random_case) whose case has `world` ranks (and T == tp when given)."""
    found = []
    seed = 0
    while len(found) < want:
        case = random_case(seed)
        if case["ep_world_size"] * max(case["tp_world_size"], 1) == world and (tp is None or case["tp_world_size"] == tp):
            found.append(seed)
        seed += 1
    return found


def rank_kwargs(case, g):
    t = case["tp_world_size"]
    tt = max(t, 1)
    return dict(ep_world_size=case["ep_world_size"], ep_rank_id=g // tt, moe_expert_num=case["moe_expert_num"],
                tp_world_size=t, tp_rank_id=g % tt, shared_expert_rank_num=case["shared_expert_rank_num"],
                global_bs=case["global_bs"])


def to_mask(mask, kind, strided=False):
    """A bool mask as the given kind; strided: every other element of a twice as long buffer."""
    if mask is None:
        return None
    if strided:  # (BS,) or (BS, K): every other element of the last dimension
        wide = np.zeros(mask.shape[:-1] + (mask.shape[-1] * 2,), dtype=bool)
        wide[..., ::2] = mask
        return torch.from_numpy(wide)[..., ::2] if kind == "torch" else wide[..., ::2]
    return torch.from_numpy(mask.copy()) if kind == "torch" else mask.copy()


def check_rank(g, n, case, kind, strided, job=None, groups=None, ints=None, wrap=None, outputs=None):
    """Runs rank g's dispatch and combine of `case` and compares every output with the oracle's, bit for
    bit. The groups are moedist.new_group(job, ...) unless `groups` (an (ep, tp) pair) is given. `ints`
    turns each int argument into the form to pass (e.g. np.int64), `wrap` each input tensor. A rank's
    x_active_mask goes to dispatch and combine; strided also passes combine expand_idx as (BS, K), as
    programs that keep dispatch's reshaped copy do. `outputs`, a list, receives copies of the bits of
    dispatch's seven results and combine's, for callers that compare runs with each other too."""
    ints = ints or (lambda v: v)
    wrap = wrap or (lambda t: t)
    want = _moedist.oracle_run(case)[g]
    t = case["tp_world_size"]
    ep, tp = groups if groups is not None else moedist.new_group(job, g, n, tp_world_size=t)
    r = case["ranks"][g]
    kw = {name: ints(value) for name, value in rank_kwargs(case, g).items()}
    names = dict(group_ep=ep.get_hccl_comm_name(g), group_tp=tp.get_hccl_comm_name(g) if t == 2 else "")
    dtype = case["dtype"]
    given = lambda t: None if t is None else wrap(t)
    out = moedist.npu_moe_distribute_dispatch(
        given(to_tensor(r["x"], dtype, kind, strided)), given(to_other(r["expert_ids"], kind, strided)), **names, **kw,
        scales=given(to_other(r.get("scales"), kind, strided)),
        expert_scales=given(to_other(r.get("expert_scales"), kind, strided)),
        x_active_mask=given(to_mask(r.get("x_active_mask"), kind, strided)),
        quant_mode=ints(case["quant_mode"]), expert_token_nums_type=ints(case["expert_token_nums_type"]))
    expand_x, dynamic_scales, expand_idx, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales = out
    kinds = {type(o).__module__.split(".")[0] for o in out}
    assert kinds == {"torch" if kind == "torch" else "numpy"}, kinds
    valid = want["valid_rows"]
    np.testing.assert_array_equal(bits_of(expand_x)[:valid], want["expand_x"], err_msg=f"rank {g} expand_x")
    if case["quant_mode"] == 2:
        np.testing.assert_array_equal(bits_of(dynamic_scales)[:valid], want["dynamic_scales"], err_msg=f"rank {g} dynamic_scales")
    if "expert_scales" in r:
        np.testing.assert_array_equal(bits_of(expand_scales)[:valid], want["expand_scales"], err_msg=f"rank {g} expand_scales")
    np.testing.assert_array_equal(bits_of(expand_idx), want["expand_idx"], err_msg=f"rank {g} expand_idx")
    np.testing.assert_array_equal(bits_of(expert_token_nums), want["expert_token_nums"], err_msg=f"rank {g} expert_token_nums")
    np.testing.assert_array_equal(bits_of(ep_recv_counts), want["ep_recv_counts"], err_msg=f"rank {g} ep_recv_counts")
    if t == 2:
        np.testing.assert_array_equal(bits_of(tp_recv_counts), want["tp_recv_counts"], err_msg=f"rank {g} tp_recv_counts")
    assert tuple(expand_x.shape)[0] >= valid and tuple(tp_recv_counts.shape) == (t,)

    weights = r.get("expert_scales")
    if weights is None:
        weights = np.ones(r["expert_ids"].shape, np.float32)
    if strided:
        expand_idx = expand_idx.reshape(r["expert_ids"].shape)
    y = moedist.npu_moe_distribute_combine(
        given(to_tensor(r["combine_x"], dtype, kind, strided)), given(to_other(r["expert_ids"], kind, strided)), expand_idx,
        ep_recv_counts, given(to_other(weights, kind, strided)), **names, **kw, tp_send_counts=tp_recv_counts,
        x_active_mask=given(to_mask(r.get("x_active_mask"), kind, strided)), comm_quant_mode=ints(case["comm_quant_mode"]))
    np.testing.assert_array_equal(bits_of(y), want["combine_out"], err_msg=f"rank {g} combine output")
    if outputs is not None:
        outputs.extend(np.array(bits_of(o)) for o in (*out, y))
    return valid
