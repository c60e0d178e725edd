"""Training-step throughput of the QSMRim-Net backbone stacked G ways (grouped convolutions), per memory format.

One step = forward + backward + Adam of a ResNet-18-3D stack at batch 64 per member; the figure is member
samples per second (G x 64 / step time), so G = 1 is the unstacked baseline in the same run. Needs only torch.

    python bench/stack_step.py --groups 1 3 5 15 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def step_rate(groups: int, channels_last: bool, *, base: int, batch: int, steps: int, warmup: int, device: str) -> float:
    import torch

    from qsmrim.models import resnet18_3d, stack_networks
    from qsmrim.models.stacked import stacked_input

    torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = stack_networks([resnet18_3d(2, base) for _ in range(groups)]).to(device, memory_format=fmt).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    xs = [torch.randn(batch, 2, 16, 32, 32, device=device) for _ in range(groups)]
    x = stacked_input(xs).contiguous(memory_format=fmt)

    def step():
        out = net(x)
        loss = out.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return groups * batch * steps / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, nargs="+", default=[1, 3, 5, 15])
    p.add_argument("--base-channels", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import torch

    rows = []
    for g in args.groups:
        for cl in (False, True):
            rate = step_rate(g, cl, base=args.base_channels, batch=args.batch, steps=args.steps, warmup=args.warmup,
                             device=args.device)  # fmt: skip
            rows.append({"groups": g, "channels_last": cl, "member_samples_per_s": rate})
            print(f"G={g:2d} channels_last={cl!s:5}: {rate:8.0f} member samples/s", flush=True)
    base = {r["channels_last"]: r["member_samples_per_s"] for r in rows if r["groups"] == 1}
    for r in rows:
        r["ratio_vs_unstacked_contiguous"] = r["member_samples_per_s"] / base[False]
    out = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__,
           "base_channels": args.base_channels, "batch": args.batch, "rows": rows}  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
