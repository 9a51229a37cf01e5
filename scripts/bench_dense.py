"""Dense-part timing on CPU and/or CUDA: the models' MLP towers (forward + backward + Adam step)
and DIN's attention unit (forward + backward over 45 behaviors per row).

    python scripts/bench_dense.py --devices cpu --threads 2                  # here
    python scripts/bench_dense.py --devices cuda cpu --json out.json         # on a GPU machine
    python scripts/bench_dense.py --from-json out.json                       # table → docs/benchmarks.md

Only torch and recsys.layers are imported, so it runs where torchrec is not installed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from recsys.layers.mlp import MLP

# (name, input width, hidden units): the ml100k base model's tower (11 pooled 16-d features + 2 numeric)
# and a Criteo-sized one (26 x 64-d + 13 numeric), the DLRM top-MLP scale.
CASES = [("ml100k base tower", 11 * 16 + 2, [200, 80]), ("criteo-sized tower", 26 * 64 + 13, [1024, 512, 256])]
BATCHES = [1024, 8192, 65536]


def _rate(step, device: str, batch: int, steps: int, warmup: int = 3) -> float:
    """Rows per second of ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def time_case(device: str, width: int, hidden: list[int], batch: int, dtype: torch.dtype, steps: int) -> float:
    torch.manual_seed(0)
    model = MLP(width, hidden, 1).to(device=device, dtype=dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, width, device=device, dtype=dtype)
    y = torch.randint(0, 2, (batch,), device=device).to(dtype)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)
        loss.backward()
        optimizer.step()

    return _rate(step, device, batch, steps)


def time_attention(device: str, batch: int, dtype: torch.dtype, steps: int, history: int = 45, dim: int = 32) -> float:
    """DIN's activation unit ([36] Dice, softmax) over ``history`` behaviors per row, fwd + bwd."""
    from recsys.layers.attention import TargetAttention

    torch.manual_seed(0)
    attention = TargetAttention(dim, [36], "dice", softmax=True).to(device=device, dtype=dtype)
    query = torch.randn(batch, dim, device=device, dtype=dtype, requires_grad=True)
    keys = torch.randn(batch * history, dim, device=device, dtype=dtype, requires_grad=True)
    lengths = torch.full((batch,), history, device=device)

    def step() -> None:
        attention(query, keys, lengths).pow(2).mean().backward()

    return _rate(step, device, batch, steps)


def measure(devices: list[str], threads: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    rows = []
    for device in devices:
        dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
        for name, width, hidden in CASES:
            for batch in BATCHES:
                for dtype in dtypes:
                    n = steps if device == "cuda" else max(3, steps // 10)
                    rate = time_case(device, width, hidden, batch, dtype, n)
                    rows.append({"device": device, "case": name, "batch": batch, "dtype": str(dtype).split(".")[-1], "samples_per_s": rate})
                    print(f"{device:4s} {name:20s} batch {batch:6d} {rows[-1]['dtype']:8s} {rate:14,.0f} samples/s", flush=True)
        for batch in (1024, 8192):
            for dtype in dtypes:
                n = steps if device == "cuda" else max(3, steps // 10)
                rate = time_attention(device, batch, dtype, n)
                rows.append({"device": device, "case": "DIN attention (45 behaviors, D=32)", "batch": batch,
                             "dtype": str(dtype).split(".")[-1], "samples_per_s": rate})
                print(f"{device:4s} DIN attention        batch {batch:6d} {rows[-1]['dtype']:8s} {rate:14,.0f} samples/s", flush=True)
    gpu = torch.cuda.get_device_name(0) if "cuda" in devices else None
    return {"rows": rows, "gpu": gpu, "cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
            "torch": torch.__version__, "threads": threads, "date": time.strftime("%Y-%m-%d")}


def to_markdown(result: dict, command: str) -> str:
    lines = [
        "## Dense towers on CPU and GPU (`scripts/bench_dense.py`)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {result['gpu'] or 'no GPU'}; CPU rows with {result['threads']} torch threads on that machine's CPU; "
        f"torch {result['torch']}; {result['date']}. Towers: forward + backward + Adam step; attention: "
        "forward + backward; samples (rows) per second.",
        "",
        "| tower | batch | dtype | " + " | ".join(sorted({r['device'] for r in result['rows']})) + " |",
        "|---|---|---|" + "---|" * len({r['device'] for r in result['rows']}),
    ]
    devices = sorted({r["device"] for r in result["rows"]})
    keys = sorted({(r["case"], r["batch"], r["dtype"]) for r in result["rows"]}, key=lambda k: (k[0], k[1], k[2]))
    for case, batch, dtype in keys:
        cells = []
        for d in devices:
            match = [r for r in result["rows"] if (r["device"], r["case"], r["batch"], r["dtype"]) == (d, case, batch, dtype)]
            cells.append(f"{match[0]['samples_per_s']:,.0f}" if match else "—")
        lines.append(f"| {case} | {batch} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write raw results here")
    parser.add_argument("--from-json", type=Path, help="only render an earlier --json result into the doc")
    parser.add_argument("--command", default="python scripts/bench_dense.py --devices cuda cpu --threads 2 --json dense.json")
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    if args.from_json:
        from recsys.eval.report import write_doc_section

        write_doc_section(args.doc, "bench_dense", to_markdown(json.loads(args.from_json.read_text()), args.command))
        return
    result = measure(args.devices, args.threads, args.steps)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
