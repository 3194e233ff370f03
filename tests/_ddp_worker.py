"""Worker for tests/test_distributed.py, run with torchrun (2 processes, gloo)."""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

from quantaware import calibrate, presets
from quantaware import distributed as qdist
from quantaware.models import MNIST1DCNN
from quantaware.qat import prepare_qat


def main(out: str) -> None:
    torch.set_num_threads(1)
    assert qdist.init_from_env()
    rank = qdist.rank()
    torch.manual_seed(0)  # the same float model on every rank
    float_model = MNIST1DCNN(width=8)
    model = prepare_qat(float_model, presets.W4A4, torch.randn(1, 1, 40))
    qdist.sync_observers(model)
    # Each rank sees different data: statistics must still end up identical.
    gen = torch.Generator().manual_seed(100 + rank)
    calib = [torch.randn(16, 1, 40, generator=gen) * (1 + rank) for _ in range(3)]
    calibrate(model, calib)
    after_calibration = qdist.quantizer_state_mismatches(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for _ in range(4):
        x = torch.randn(16, 1, 40, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after_training = qdist.quantizer_state_mismatches(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, {n: p.tolist() for n, p in params.items()})
    weights_equal = gathered[0] == gathered[1]
    scales = [float(q.effective_scale().detach().reshape(-1)[0])
              for n, q in model.named_modules()
              if n.endswith("input_quantizer")]
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"after_calibration": after_calibration, "after_training": after_training,
                       "weights_equal": weights_equal, "scales": scales,
                       "num_quantizer_tensors": len(qdist.quantizer_state(model))}, f)
    # Every rank reaches this point before the process group goes away: tearing
    # gloo down while the other rank is still in a collective aborts the process.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
