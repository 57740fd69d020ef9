# The single-operator example of torch_npu.npu_moe_distribute_dispatch's documentation page
# (../shared/reference/seed-torch_npu-moe-distribute-dispatch.txt), running on CPUs with moedist: 16
# processes, 2 shared-expert ranks, 14 MoE experts, BS 8, H 7168, K 8, quant_mode 2 with smooth scales,
# dispatch then combine. Changed from the page: the torch_npu import (moedist under the same name), the
# device lines (no .npu(), no set_device, gloo instead of hccl) and the group-name function
# (moedist.get_hccl_comm_name of the torch.distributed group). Added: each rank checks its combine output
# against a reference and prints one line; the run fails if any rank does.
#
#   PYTHONPATH=build/release/python /usr/bin/python3 examples/torch_npu_example.py
#
# With MOEDIST_EXAMPLE_DEVICE=cuda (a build with the CUDA backend, a GPU), the page's device lines come
# back as CUDA: each rank sets its device (rank modulo the GPUs; ranks share one) and moves its inputs
# there, as the page's .npu() does; the operators then run on the CUDA group, and moedist.synchronize
# raises what only the GPU saw before the output is checked.
import os
import torch
import random
import moedist as torch_npu            # moedist: torch_npu's MoE operators on CPUs
import numpy as np
import sys
from torch.multiprocessing import Process
import torch.distributed as dist
from torch.distributed import ReduceOp

# 控制模式
quant_mode = 2                       # 2为动态量化
is_dispatch_scales = True            # 动态量化可选择是否传scales
input_dtype = torch.bfloat16         # 输出dtype
server_num = 1
server_index = 0
port = 50001
master_ip = '127.0.0.1'
dev_num = 16
world_size = server_num * dev_num
rank_per_dev = int(world_size / server_num)  # 每个host有几个die
sharedExpertRankNum = 2                      # 共享专家数
moeExpertNum = 14                            # moe专家数
bs = 8                                       # token数量
h = 7168                                     # 每个token的长度
k = 8
random_seed = 0
tp_world_size = 1
ep_world_size = int(world_size / tp_world_size)
moe_rank_num = ep_world_size - sharedExpertRankNum
local_moe_expert_num = moeExpertNum // moe_rank_num
globalBS = bs * ep_world_size
is_shared = (sharedExpertRankNum > 0)
is_quant = (quant_mode > 0)
device = os.environ.get("MOEDIST_EXAMPLE_DEVICE", "cpu")  # moedist: "cuda" runs on the GPU(s)

def gen_unique_topk_array(low, high, bs, k):
    array = []
    for i in range(bs):
        top_idx = list(np.arange(low, high, dtype=np.int32))
        random.shuffle(top_idx)
        array.append(top_idx[0:k])
    return np.array(array)

def get_new_group(rank):
    for i in range(tp_world_size):
        # 如果tp_world_size = 2,ep_world_size = 8,则为[[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]]
        ep_ranks = [x * tp_world_size + i for x in range(ep_world_size)]
        ep_group = dist.new_group(backend="gloo", ranks=ep_ranks)
        if rank in ep_ranks:
            ep_group_t = ep_group
            print(f"rank:{rank} ep_ranks:{ep_ranks}")
    for i in range(ep_world_size):
        # 如果tp_world_size = 2,ep_world_size = 8,则为[[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
        tp_ranks = [x + tp_world_size * i for x in range(tp_world_size)]
        tp_group = dist.new_group(backend="gloo", ranks=tp_ranks)
        if rank in tp_ranks:
            tp_group_t = tp_group
            print(f"rank:{rank} tp_ranks:{tp_ranks}")
    return ep_group_t, tp_group_t

def get_hcomm_info(rank, comm_group):
    hcomm_info = torch_npu.get_hccl_comm_name(comm_group, rank)   # moedist names torch.distributed groups
    return hcomm_info

# moedist: the reference. Every expert here is the identity on the int8 rows (expand_x.to(bfloat16)), so a
# token's combine output is sum_k expert_scales[k] * q_k + q_shared, where q_e is the token quantized with
# this rank's smooth scales row of expert e (contract §2.2: fp32 multiply, amax, 127/amax, rint half-even),
# added in fp32 in increasing k with the shared expert last (§4.2, §4.3), then rounded to bfloat16.
def reference_combine(x, expert_ids, scales, expert_scales):
    xf = x.float().numpy()
    s = scales.numpy() if scales is not None else None
    w = expert_scales.numpy()

    def quantized(row, scales_row):
        v = xf[row] * s[scales_row] if s is not None else xf[row].copy()
        ds = np.float32(127.0) / np.abs(v).max()
        return np.rint(v * ds).astype(np.float32)

    out = np.zeros((bs, h), dtype=np.float32)
    for b in range(bs):
        acc = np.zeros(h, dtype=np.float32)
        for j in range(k):
            e = int(expert_ids[b, j])
            acc = acc + w[b, j] * quantized(b, e + 1 if is_shared else e)
        if is_shared:
            acc = acc + quantized(b, 0)
        out[b] = acc
    bits = out.view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16        # fp32 -> bfloat16, round half to even
    return bits.astype(np.uint16).view(np.int16)


def run_npu_process(rank):
    # torch_npu.npu.set_device(rank): on CPUs there is no device to pick
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    rank = rank + 16 * server_index
    dist.init_process_group(backend='gloo', rank=rank, world_size=world_size, init_method=f'tcp://{master_ip}:{port}')
    ep_group, tp_group = get_new_group(rank)
    ep_hcomm_info = get_hcomm_info(rank, ep_group)
    tp_hcomm_info = get_hcomm_info(rank, tp_group)

    # 创建输入tensor
    x = torch.randn(bs, h, dtype=input_dtype)
    expert_ids = gen_unique_topk_array(0, moeExpertNum, bs, k).astype(np.int32)
    expert_ids = torch.from_numpy(expert_ids)

    expert_scales = torch.randn(bs, k, dtype=torch.float32)
    scales_shape = (1 + moeExpertNum, h) if sharedExpertRankNum else (moeExpertNum, h)
    if is_dispatch_scales:
        scales = torch.randn(scales_shape, dtype=torch.float32)
    else:
        scales = None
    if device == "cuda":  # the page's .npu(); the reference below reads the CPU copies
        x_cpu, ids_cpu, scales_cpu, weights_cpu = x, expert_ids, scales, expert_scales
        x, expert_ids, expert_scales = x.cuda(), expert_ids.cuda(), expert_scales.cuda()
        scales = scales.cuda() if scales is not None else None

    expand_x, dynamic_scales, expand_idx, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales = torch_npu.npu_moe_distribute_dispatch(
        x=x,
        expert_ids=expert_ids,
        group_ep=ep_hcomm_info,
        group_tp=tp_hcomm_info,
        ep_world_size=ep_world_size,
        tp_world_size=tp_world_size,
        ep_rank_id=rank // tp_world_size,
        tp_rank_id=rank % tp_world_size,
        expert_shard_type=0,
        shared_expert_rank_num=sharedExpertRankNum,
        moe_expert_num=moeExpertNum,
        scales=scales,
        quant_mode=quant_mode,
        global_bs=globalBS)
    if is_quant:
        expand_x = expand_x.to(input_dtype)
    x_in = x
    x = torch_npu.npu_moe_distribute_combine(expand_x=expand_x,
                                             expert_ids=expert_ids,
                                             expand_idx=expand_idx,
                                             ep_send_counts=ep_recv_counts,
                                             tp_send_counts=tp_recv_counts,
                                             expert_scales=expert_scales,
                                             group_ep=ep_hcomm_info,
                                             group_tp=tp_hcomm_info,
                                             ep_world_size=ep_world_size,
                                             tp_world_size=tp_world_size,
                                             ep_rank_id=rank // tp_world_size,
                                             tp_rank_id=rank % tp_world_size,
                                             expert_shard_type=0,
                                             shared_expert_rank_num=sharedExpertRankNum,
                                             moe_expert_num=moeExpertNum,
                                             global_bs=globalBS)
    # moedist: check this rank's combine output against a reference computed here from its own inputs.
    if device == "cuda":
        torch_npu.synchronize(ep_hcomm_info)
        x_in, expert_ids, scales, expert_scales, x = x_cpu, ids_cpu, scales_cpu, weights_cpu, x.cpu()
    want = reference_combine(x_in, expert_ids, scales, expert_scales)
    got = x.view(torch.int16).numpy()
    result = "matches the reference bit for bit" if np.array_equal(got, want) else \
        f"MISMATCH in {int((got != want).sum())} of {got.size} elements"
    print(f'rank {rank} epid {rank // tp_world_size} tpid {rank % tp_world_size}: combine output {result}\n', end='', flush=True)
    if not np.array_equal(got, want):
        sys.exit(1)

if __name__ == "__main__":
    print(f"bs={bs}")
    print(f"global_bs={globalBS}")
    print(f"shared_expert_rank_num={sharedExpertRankNum}")
    print(f"moe_expert_num={moeExpertNum}")
    print(f"k={k}")
    print(f"quant_mode={quant_mode}", flush=True)
    print(f"local_moe_expert_num={local_moe_expert_num}", flush=True)
    print(f"tp_world_size={tp_world_size}", flush=True)
    print(f"ep_world_size={ep_world_size}", flush=True)

    if tp_world_size != 1 and local_moe_expert_num > 1:
        print("unSupported tp = 2 and local moe > 1")
        exit(0)

    if sharedExpertRankNum > ep_world_size:
        print("sharedExpertRankNum 不能大于 ep_world_size")
        exit(0)

    if sharedExpertRankNum > 0 and ep_world_size % sharedExpertRankNum != 0:
        print("ep_world_size 必须是 sharedExpertRankNum的整数倍")
        exit(0)

    if moeExpertNum % moe_rank_num != 0:
        print("moeExpertNum 必须是 moe_rank_num 的整数倍")
        exit(0)

    p_list = []
    for rank in range(rank_per_dev):
        p = Process(target=run_npu_process, args=(rank,))
        p_list.append(p)
    for p in p_list:
        p.start()
    for p in p_list:
        p.join()
    if any(p.exitcode != 0 for p in p_list):
        print("run failed: " + ", ".join(f"rank {r} exit code {p.exitcode}" for r, p in enumerate(p_list) if p.exitcode))
        sys.exit(1)
    print("run npu success.")
