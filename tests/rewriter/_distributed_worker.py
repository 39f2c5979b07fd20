"""Worker of tests/rewriter/test_distributed.py, started by ``torch.distributed.run``:

    python -m torch.distributed.run --nproc_per_node 2 _distributed_worker.py ddp RECIPE out.json \
        [MOE_FIRST_STEPS]

Converts llama-tiny with RECIPE (moe-only, or deepseek-v3: MoE + FP8 training), wraps it (``ddp``:
DistributedDataParallel; ``fsdp2``: ``fully_shard`` on each layer and the root; ``single``: no
wrapper, one process) and trains a few steps on the global batch with rewriter.training.train.
MOE_FIRST_STEPS (default 0): ``TrainConfig.moe_first_steps``, the first steps train only the
MoE blocks. Rank 0 writes the per-step losses, the final expert biases and a parameter
checksum.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import rewriter  # noqa: E402
from rewriter import models  # noqa: E402
from rewriter.training import TextData, TrainConfig, moe_blocks, train  # noqa: E402

STEPS, BATCH, SEQ = 4, 4, 32


def main(kind: str, recipe: str, out: str, moe_first: str = "0") -> None:
    if kind != "single":
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = rewriter.convert(models.build_model("llama-tiny", seed=0), recipe=recipe)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    elif kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    data = TextData.from_corpus(None, eval_tokens=1024, eval_len=64)
    config = TrainConfig(steps=STEPS, batch_size=BATCH, seq_len=SEQ, lr=3e-3, warmup_steps=1,
                         bias_update_rate=1e-2, moe_first_steps=int(moe_first))
    result = train(model, data, config, progress=False)
    params = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        params[name.replace("module.", "")] = float(full.detach().double().abs().sum())
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({
            "losses": [h["loss"] for h in result.history],
            "eval_ppl": result.history[-1]["eval_ppl"],
            "expert_bias": [b.expert_bias.tolist() for _, b in moe_blocks(model)],
            "param_abs_sum": params,
        }))
    if kind != "single":
        # every rank past its last collective before teardown: a rank tearing gloo down while
        # another still writes its results aborted once ("terminate called without an active
        # exception", SIGABRT on rank 1, a fresh clone's test run, session 6)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
