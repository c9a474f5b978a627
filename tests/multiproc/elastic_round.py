"""One worker of a 2-rank torchrun job with --max-restarts 1 (test_distributed.py).

Round 0: the group forms, one all-reduce, then rank 1 dies. Round 1: rank 0 reaches the
process group 2 s after rank 1, so rank 1 reads rank 0's gloo address before rank 0 has
written this round's: with the dead round's keys still in torchrun's shared store it gets
the dead process's port and the round fails; with keys scoped per round it waits for the
fresh one. Prints `round 1 ok` when the restarted group formed and summed correctly.
"""

import os
import time

import torch
import torch.distributed as dist

from bitblend.config.schema import DistributedConfig
from bitblend.train import distributed

rank = int(os.environ["RANK"])
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if attempt == 1 and rank == 0:
    time.sleep(2.0)
ctx = distributed.init(DistributedConfig(strategy="ddp", timeout_s=10), "cpu")
t = torch.ones(1)
dist.all_reduce(t)
assert float(t) == 2.0
if attempt == 0:
    if rank == 1:
        os._exit(3)  # a worker dies: torchrun stops rank 0 and starts round 1
    time.sleep(60)  # stopped by the agent long before this ends
else:
    print(f"round {attempt} ok", flush=True)
    distributed.teardown()
