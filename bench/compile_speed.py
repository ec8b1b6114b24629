"""Does torch.compile pay on this CPU? One training step of the recipe's net (airbench, batch
2,000, bf16 autocast, channels-last), eager against torch.compile, side by side in one run.

Reported: the compile time (the first compiled steps), the seconds per step of each after
warm-up (the fastest of --steps), their ratio, and the break-even: how many steps a run needs
before the compile time is won back (the recipe runs 200).

    python bench/compile_speed.py [--batch 2000] [--steps 5] [--mode default]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cifarx.plugins.airbench import build_airbench


def step_fn(net, optimizer):
    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def timed_steps(step, x, y, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--mode", default="default", help="torch.compile's mode")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    results = {}
    for name in ("eager", "compiled"):
        net = build_airbench().to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01,
                                    momentum=0.9, nesterov=True)
        if name == "compiled":
            net = torch.compile(net, mode=args.mode)
        step = step_fn(net, optimizer)
        start = time.perf_counter()
        step(x, y)  # compiles forward and backward (eager: allocations warmed)
        step(x, y)
        first = time.perf_counter() - start
        results[name] = (first, min(timed_steps(step, x, y, args.steps)))
        print(f"{name}: first two steps {first:.1f} s, then {results[name][1]:.2f} s per step",
              flush=True)
    eager, compiled = results["eager"][1], results["compiled"][1]
    overhead = results["compiled"][0] - 2 * compiled
    print(f"compiled / eager per step: {compiled / eager:.2f}")
    if compiled < eager:
        print(f"break-even after {overhead / (eager - compiled):.0f} steps (compile ~{overhead:.0f} s)")
    else:
        print(f"never pays: slower per step, and {overhead:.0f} s to compile")


if __name__ == "__main__":
    main()
