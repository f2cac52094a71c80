"""Under torchrun: join the group as the scripts do, build an optimizer as every condensation loop does first, leave
the group, and print the gloo threads this process still runs. torch.optim's first use imports torch._dynamo, which
imports torch.distributed.nn.functional; when that happened after the group existed, its default arguments kept the
group, and its threads, alive into interpreter shutdown, where one of them could abort a successful run."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import parallel  # noqa: E402

parallel.setup('cpu')
image_syn = torch.zeros(2, 3, requires_grad=True)
torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)
parallel.Team(shared=True).gather(image_syn.detach())  # a collective whose tensors Python owns, as the runs have
parallel.finish()
parallel.shutdown()
names = [open(f'/proc/self/task/{task}/comm').read().strip() for task in os.listdir('/proc/self/task')]
left = sorted(name for name in names if 'gloo' in name)
# one write per process: the two processes share the pipe, and print() writes its pieces separately
os.write(1, f"rank {os.environ['RANK']}: gloo threads left: {left}\n".encode())
