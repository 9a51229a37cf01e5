"""Dense-part timing on CPU and/or CUDA: the models' towers (MLP, DCN-V2, FinalMLP; forward + backward +
Adam step), DIN's attention unit and BST's transformer (forward + backward over 45 behaviors per row),
the eight text pooling heads (forward + backward over cached token states) and the MiniLM encoder
(inference).

    python scripts/bench_dense.py --devices cpu --threads 2                  # here
    python scripts/bench_dense.py --devices cuda cpu --json out.json         # on a GPU machine
    python scripts/bench_dense.py --from-json out.json                       # table → docs/benchmarks.md

Only torch, transformers and recsys.layers / recsys.text.pooling are imported, so it runs where
torchrec is not installed: DCN-V2's cross layers then come from torchrec's ``crossnet.py`` file given
with ``--torchrec-crossnet`` (a torch-only module), and the encoder is MiniLM's architecture built
from the config in ``--encoder-config`` (random weights: timing does not depend on them).
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
PARTS = ["towers", "attention", "dcnv2", "finalmlp", "bst", "heads", "encoder"]


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


def time_tower(device: str, tower: torch.nn.Module, width: int, batch: int, dtype: torch.dtype, steps: int) -> float:
    """Forward + backward + Adam step of a tower ``[B, width] → [B]`` (a logit per row)."""
    tower = tower.to(device=device, dtype=dtype)
    optimizer = torch.optim.Adam(tower.parameters(), lr=1e-3)
    x = torch.randn(batch, width, device=device, dtype=dtype)
    y = torch.randint(0, 2, (batch,), device=device).to(dtype)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.binary_cross_entropy_with_logits(tower(x), y).backward()
        optimizer.step()

    return _rate(step, device, batch, steps)


class _DCNv2Tower(torch.nn.Module):
    def __init__(self, width: int, hidden: list[int]) -> None:
        super().__init__()
        from recsys.layers.interaction import cross_network

        self.cross, self.dnn = cross_network(width, 3), MLP(width, hidden)
        self.out = torch.nn.Linear(width + hidden[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.cross(x), self.dnn(x)], dim=1)).squeeze(-1)


class _FinalMLPTower(torch.nn.Module):
    def __init__(self, width: int, hidden: list[int]) -> None:
        super().__init__()
        from recsys.layers.interaction import BilinearFusion, FeatureGating

        self.gates = torch.nn.ModuleList(FeatureGating(width, 0, [64]) for _ in range(2))
        self.mlp1, self.mlp2 = MLP(width, hidden), MLP(width, [2 * hidden[0]])
        self.fusion = BilinearFusion(hidden[-1], 2 * hidden[0], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fusion(self.mlp1(self.gates[0](x)), self.mlp2(self.gates[1](x)))


def time_bst(device: str, batch: int, dtype: torch.dtype, steps: int, history: int = 45, dim: int = 32) -> float:
    """BST's encoder (d = 32, 2 heads, 1 layer) over the target + ``history`` behaviors per row, fwd + bwd."""
    from recsys.layers.sequence import SequenceTransformer

    torch.manual_seed(0)
    encoder = SequenceTransformer(dim, 32, 2, 1, 0.1, history).to(device=device, dtype=dtype)
    target = torch.randn(batch, dim, device=device, dtype=dtype, requires_grad=True)
    keys = torch.randn(batch * history, dim, device=device, dtype=dtype, requires_grad=True)
    lengths = torch.full((batch,), history, device=device)

    def step() -> None:
        encoder(target, keys, lengths).pow(2).mean().backward()

    return _rate(step, device, batch, steps)


def time_head(
    device: str,
    name: str,
    batch: int,
    dtype: torch.dtype,
    steps: int,
    tokens: int = 32,
    width: int = 384,
    layers: int = 7,
) -> float:
    """A text pooling head + a 384 → 4 projection over cached token states of ``batch`` texts, fwd + bwd."""
    from recsys.text.pooling import make_pooling

    torch.manual_seed(0)
    head = make_pooling(name, width, num_layers=layers, **({"num_latents": 16} if name == "latent" else {}))
    project = torch.nn.Linear(width, 4)
    params = list(head.parameters()) + list(project.parameters())
    head, project = head.to(device=device, dtype=dtype), project.to(device=device, dtype=dtype)
    shape = (layers, batch, tokens, width) if name == "multilayer" else (batch, tokens, width)
    states = torch.randn(*shape, device=device, dtype=dtype)
    mask = (torch.arange(tokens, device=device) < torch.randint(4, tokens + 1, (batch, 1), device=device)).long()

    def step() -> None:
        out = project(head(states, mask)).pow(2).mean()
        if any(p.requires_grad for p in params):
            out.backward()

    return _rate(step, device, batch, steps)


def time_encoder(device: str, config_dir: Path, batch: int, dtype: torch.dtype, steps: int, tokens: int = 32) -> float:
    """MiniLM-L6's forward (inference) on ``batch`` texts of ``tokens`` tokens, all hidden states."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(config_dir)).to(device=device, dtype=dtype).eval()
    ids = torch.randint(1000, 20000, (batch, tokens), device=device)
    mask = torch.ones_like(ids)

    def step() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, output_hidden_states=True)

    return _rate(step, device, batch, steps)


def _load_crossnet(path: Path | None) -> None:
    """Without torchrec (a GPU machine here): torchrec's crossnet.py (torch only) as ``torchrec.modules.crossnet``."""
    import importlib.util
    import sys
    import types

    try:
        import torchrec.modules.crossnet  # noqa: F401

        return
    except ImportError:
        if path is None:
            raise
    for name in ("torchrec", "torchrec.modules"):
        sys.modules.setdefault(name, types.ModuleType(name))
    spec = importlib.util.spec_from_file_location("torchrec.modules.crossnet", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["torchrec.modules.crossnet"] = module
    spec.loader.exec_module(module)


def _row(rows: list, device: str, case: str, batch: int, dtype: torch.dtype, rate: float) -> None:
    rows.append(
        {"device": device, "case": case, "batch": batch, "dtype": str(dtype).split(".")[-1], "samples_per_s": rate}
    )
    print(f"{device:4s} {case:38s} batch {batch:6d} {rows[-1]['dtype']:8s} {rate:14,.0f} samples/s", flush=True)


def measure_more(devices: list[str], steps: int, parts: list[str], encoder_config: Path | None) -> list[dict]:
    """The parts beyond the MLP towers and DIN's attention."""
    rows: list[dict] = []
    for device in devices:
        dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
        n = steps if device == "cuda" else max(3, steps // 10)
        for name, width, hidden in CASES:
            for tower_name, make in (("DCN-V2", _DCNv2Tower), ("FinalMLP", _FinalMLPTower)):
                if tower_name.lower().replace("-", "") not in parts:
                    continue
                for batch in (1024, 8192):
                    for dtype in dtypes:
                        torch.manual_seed(0)
                        rate = time_tower(device, make(width, hidden), width, batch, dtype, n)
                        _row(rows, device, f"{tower_name} tower ({name})", batch, dtype, rate)
        if "bst" in parts:
            for batch in (1024, 8192):
                for dtype in dtypes:
                    _row(
                        rows,
                        device,
                        "BST encoder (45 behaviors, d=32)",
                        batch,
                        dtype,
                        time_bst(device, batch, dtype, n),
                    )
        if "heads" in parts:
            from recsys.text.pooling import HEADS

            for head in HEADS:
                for dtype in dtypes:
                    _row(
                        rows,
                        device,
                        f"text head {head} (32 tokens × 384)",
                        1024,
                        dtype,
                        time_head(device, head, 1024, dtype, n),
                    )
        if "encoder" in parts and encoder_config is not None:
            for batch in (128, 1024):
                for dtype in dtypes:
                    _row(
                        rows,
                        device,
                        "MiniLM-L6 encoder (32 tokens, inference)",
                        batch,
                        dtype,
                        time_encoder(device, encoder_config, batch, dtype, max(2, n // 5)),
                    )
    return rows


def measure(
    devices: list[str], threads: int, steps: int, parts: list[str] | None = None, encoder_config: Path | None = None
) -> dict:
    torch.set_num_threads(threads)
    parts = parts or PARTS
    rows = []
    for device in devices if "towers" in parts or "attention" in parts else []:
        dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
        for name, width, hidden in CASES if "towers" in parts else []:
            for batch in BATCHES:
                for dtype in dtypes:
                    n = steps if device == "cuda" else max(3, steps // 10)
                    rate = time_case(device, width, hidden, batch, dtype, n)
                    rows.append(
                        {
                            "device": device,
                            "case": name,
                            "batch": batch,
                            "dtype": str(dtype).split(".")[-1],
                            "samples_per_s": rate,
                        }
                    )
                    print(
                        f"{device:4s} {name:20s} batch {batch:6d} {rows[-1]['dtype']:8s} {rate:14,.0f} samples/s",
                        flush=True,
                    )
        for batch in (1024, 8192) if "attention" in parts else ():
            for dtype in dtypes:
                n = steps if device == "cuda" else max(3, steps // 10)
                rate = time_attention(device, batch, dtype, n)
                rows.append(
                    {
                        "device": device,
                        "case": "DIN attention (45 behaviors, D=32)",
                        "batch": batch,
                        "dtype": str(dtype).split(".")[-1],
                        "samples_per_s": rate,
                    }
                )
                print(
                    f"{device:4s} DIN attention        batch {batch:6d} {rows[-1]['dtype']:8s} {rate:14,.0f} samples/s",
                    flush=True,
                )
    rows += measure_more(devices, steps, parts, encoder_config)
    gpu = torch.cuda.get_device_name(0) if "cuda" in devices else None
    return {
        "rows": rows,
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "cores": torch.get_num_threads(),
        "torch": torch.__version__,
        "threads": threads,
        "date": time.strftime("%Y-%m-%d"),
    }


def to_markdown(result: dict, command: str) -> str:
    lines = [
        "## Dense towers on CPU and GPU (`scripts/bench_dense.py`)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {result['gpu'] or 'no GPU'}; CPU rows with {result['threads']} torch threads on that machine's CPU; "
        f"torch {result['torch']}; {result['date']}. Towers (MLP, DCN-V2 with 3 full-rank cross layers, FinalMLP with "
        "two gated streams and bilinear fusion): forward + backward "
        "+ Adam step; DIN attention and BST encoder: forward + "
        "backward; text heads: head + 384→4 projection, forward + backward over cached token states (parameter-free "
        "heads: forward only); MiniLM-L6: inference with all hidden states, random weights of its architecture. "
        "Samples (rows, texts) per second.",
        "",
        "| tower | batch | dtype | " + " | ".join(sorted({r["device"] for r in result["rows"]})) + " |",
        "|---|---|---|" + "---|" * len({r["device"] for r in result["rows"]}),
    ]
    devices = sorted({r["device"] for r in result["rows"]})
    keys = sorted({(r["case"], r["batch"], r["dtype"]) for r in result["rows"]}, key=lambda k: (k[0], k[1], k[2]))
    for case, batch, dtype in keys:
        cells = []
        for d in devices:
            match = [
                r for r in result["rows"] if (r["device"], r["case"], r["batch"], r["dtype"]) == (d, case, batch, dtype)
            ]
            cells.append(f"{match[0]['samples_per_s']:,.0f}" if match else "—")
        lines.append(f"| {case} | {batch} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write raw results here")
    parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    parser.add_argument(
        "--torchrec-crossnet", type=Path, help="torchrec's modules/crossnet.py where torchrec is not installed"
    )
    parser.add_argument(
        "--encoder-config", type=Path, help="a local MiniLM directory (config.json) for the encoder part"
    )
    parser.add_argument("--from-json", type=Path, help="only render an earlier --json result into the doc")
    parser.add_argument(
        "--command", default="python scripts/bench_dense.py --devices cuda cpu --threads 2 --json dense.json"
    )
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    if args.from_json:
        from benchdoc import write_doc_section

        write_doc_section(args.doc, "bench_dense", to_markdown(json.loads(args.from_json.read_text()), args.command))
        return
    _load_crossnet(args.torchrec_crossnet)
    result = measure(args.devices, args.threads, args.steps, args.parts, args.encoder_config)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
