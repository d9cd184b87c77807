"""Run under ``torchrun --nproc-per-node N tests/dist_worker.py OUT``: every
data-driven function on this rank's shard of one batch stream; results saved to
``OUT/rank{r}.pt``. ``tests/test_distributed.py`` compares them with one process
given every batch (``run_all`` without a process group)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import autobasin  # noqa: E402
import autobasin.distributed  # noqa: E402
from autobasin.calibration import expected_calibration_error, predict  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def build():
    """Two models and 7 batches of (images, labels): an odd count, so the shards differ in size."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = Net().eval()
        with torch.no_grad():
            model.bn.running_mean.normal_()
            model.bn.running_var.uniform_(0.5, 2)
        models.append(model)
    gen = torch.Generator().manual_seed(5)
    data = [(torch.randn(6, 3, 5, 5, generator=gen) * 2 + 1, torch.randint(0, 4, (6,), generator=gen))
            for _ in range(7)]
    return models[0], models[1], data


def run_all(a, b, data, example) -> dict:
    spec = autobasin.infer_spec(a, example)
    act = autobasin.activation_matching(spec, a, b, data, progress=False)
    rebased = autobasin.auto_rebasin(a, b, example_inputs=example, method="activation", data=data,
                                     progress=False)
    fresh = Net()
    fresh.load_state_dict(a.state_dict())
    autobasin.reset_bn_stats(fresh, data)
    stats = autobasin.channel_stats(a, data)
    curve = autobasin.loss_barrier(a, rebased.model, data, lambdas=3, progress=False)
    repaired = autobasin.loss_barrier(a, rebased.model, data, lambdas=3, progress=False,
                                      repair="repair", repair_data=data)
    logits, labels = predict(a, data)
    merged = autobasin.merge_many([a, b], method="activation", data=data, example_inputs=example,
                                  progress=False)
    return {"perms": act.perms, "similarity": act.matched_similarity, "samples": act.samples,
            "batches": act.batches, "rebasin_perms": rebased.perms,
            "bn": (fresh.bn.running_mean, fresh.bn.running_var, fresh.bn.num_batches_tracked),
            "stats": {k: (v.mean, v.var, v.count) for k, v in stats.items()},
            "losses": curve.losses, "accuracies": curve.accuracies, "repaired": repaired.losses,
            "ece": expected_calibration_error(logits, labels), "n_predicted": len(labels),
            "merged": {k: v.clone() for k, v in merged.state_dict().items()}}


def mlps():
    """Two small MLPs (no BatchNorm: data-parallel STE is exact for them) and 4 batches of 8."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                                    nn.Linear(12, 3)))
    gen = torch.Generator().manual_seed(9)
    data = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(4)]
    return models[0], models[1], data


def run_ste(a, b, data) -> dict:
    spec = autobasin.infer_spec(a, data[0][0][:2])
    res = autobasin.ste_matching(spec, a, b, data, epochs=3, lr=1e-2, eval_batches=4, progress=False)
    return {"perms": res.perms, "loss_history": res.loss_history, "eval_history": res.eval_history,
            "steps": res.steps}


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    a, b, data = build()
    from autobasin.distributed import world
    mine = list(autobasin.distributed.shard(data))
    out = run_all(a, b, mine, data[0][0][:2])
    ma, mb, ste_data = mlps()
    ste = run_ste(ma, mb, list(autobasin.distributed.shard(ste_data)))
    torch.save({"result": out, "ste": ste, "world": world(), "local_batches": len(mine)},
               Path(sys.argv[1]) / f"rank{rank}.pt")
    dist.destroy_process_group()
