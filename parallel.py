"""Scale-out on torch.distributed, launched by torchrun (NCCL on GPUs, gloo on CPUs).

`python main.py ...` stays one process; `torchrun --nproc_per_node N main.py ...` starts N, one device each. A Team
is the group of processes that share one experiment: all of them when they split its classes or its evaluation
networks, only the process itself when each runs experiments of its own. Its collectives are no-ops for a team of
one, so the loops call them unconditionally. Only the main process (rank 0) prints and writes result files."""
import datetime
import os

import torch
import torch.distributed as dist

from base import UserError, get_device

# How long a collective waits for a process that does not arrive (a crashed or hung rank) before the job ends.
DEFAULT_TIMEOUT_S = 600


def launched():
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def setup(device_flag, timeout_s=DEFAULT_TIMEOUT_S):
    """Join the process group when launched by torchrun and return this process's device: cuda:LOCAL_RANK on GPUs,
    else the CPU with the cores divided between the local processes. Called after the flags are validated, so bad
    input never reaches a collective. A single process just gets its device."""
    if not launched():
        return get_device(device_flag)
    if dist.is_initialized():
        return _device_of_this_process(device_flag)
    device = _device_of_this_process(device_flag)
    backend = 'nccl' if device.startswith('cuda') else 'gloo'
    if backend == 'gloo' and 'OMP_NUM_THREADS' not in os.environ:
        local = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    # torch.distributed.nn.functional takes group.WORLD as a default argument when it is first imported, and torch
    # imports it lazily (the first optimizer pulls in torch._dynamo, which imports it). Imported after the group
    # exists, those defaults keep the group and its gloo threads alive past destroy_process_group into interpreter
    # shutdown, where a gloo thread that drops its last work needs the GIL and aborts the process ('terminate called
    # without an active exception', exit -6) after a successful run. Imported before, the defaults hold None.
    import torch.distributed.nn.functional  # noqa: F401
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def _device_of_this_process(device_flag):
    wanted = get_device(device_flag)  # checks the flag: --device cuda without CUDA is a one-line error
    if not wanted.startswith('cuda'):
        return 'cpu'
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if local_rank >= torch.cuda.device_count():
        raise UserError(f'process {local_rank} of this node has no GPU ({torch.cuda.device_count()} visible); start '
                        f'at most that many processes per node')
    torch.cuda.set_device(local_rank)
    return f'cuda:{local_rank}'


def finish():
    """After a successful run: every process waits for the others before any leaves the group (a process that tears
    its connections down while a peer is still in its last collective can abort the peer)."""
    if dist.is_initialized():
        dist.barrier()


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


class Team:
    """The processes that share one experiment, with the collectives the loops need."""

    def __init__(self, shared):
        self.size = world_size() if shared else 1
        self.rank = rank() if shared else 0

    def share(self, items):
        """This process's part of a list: items rank, rank + size, ... (all of them for a team of one)."""
        return list(items)[self.rank::self.size]

    def all_reduce_sum_(self, tensor):
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every process of the team."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensors):
        """Every process takes rank 0's values (e.g. the network after inner training: GPU kernels are not always
        deterministic, so processes that trained the same network may differ in the last bits)."""
        if self.size > 1:
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def check_identical(self, tensor, what):
        """Stop with a clear error if the processes hold different values of a tensor that must be equal."""
        if self.size == 1:
            return
        t = tensor.detach().double()
        sums = torch.stack([t.sum(), (t * t).sum()])
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise UserError(f'the {what} differs between processes (checksums {low.tolist()} vs {high.tolist()}); '
                            f'the processes diverged: rerun with the experiments split (no --dist_classes)')


def gather_to_all(obj):
    """[obj of every process] in rank order, on every process (the whole world, whatever the team)."""
    return Team(shared=True).gather(obj)
