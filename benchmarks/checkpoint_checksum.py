"""What the per-file SHA-256 of a checkpoint costs, on a MiniLM-sized model (22.7M params).

A MiniLM-L6 shaped BertModel (random init: the bytes, not the values, set the cost) with
AdamW moments after one step: a checkpoint of ~91 MB of weights + ~182 MB of state. Times
`save_checkpoint` and `load_checkpoint` (median of --repeats), and the hashing inside them
measured alone over the same files, and prints the share.

    .venv/bin/python benchmarks/checkpoint_checksum.py [--repeats 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from bitblend.train import checkpoint as ckpt


def main() -> None:
    """Print save/load time with checksums and the hashing's share of it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", help="where to write (default: the system temp dir)")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                        num_attention_heads=12, intermediate_size=1536)  # fmt: skip
    model = BertModel(config)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 30522, (2, 16))).last_hidden_state.sum().backward()
    opt.step()
    params = sum(p.numel() for p in model.parameters())
    # Wall and CPU seconds: on a shared machine the wall clock mostly measures the neighbours.
    saves, loads, hashes = [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        for i in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            path = ckpt.save_checkpoint(root, i, model, {"optimizer": opt.state_dict()})
            saves.append((time.perf_counter() - t0, time.process_time() - c0))
            t0, c0 = time.perf_counter(), time.process_time()
            ckpt.load_checkpoint(path, model)
            loads.append((time.perf_counter() - t0, time.process_time() - c0))
            blobs = [(path / n).read_bytes() for n in (ckpt.MODEL_FILE, ckpt.STATE_FILE)]
            t0, c0 = time.perf_counter(), time.process_time()
            for blob in blobs:  # hashing alone (save and load also read the files)
                hashlib.sha256(blob).hexdigest()
            hashes.append((time.perf_counter() - t0, time.process_time() - c0))
        size = sum((path / n).stat().st_size for n in (ckpt.MODEL_FILE, ckpt.STATE_FILE))
    print(f"{params / 1e6:.1f}M params, checkpoint {size / 1e6:.0f} MB, median of {args.repeats}")
    for k, clock in enumerate(("wall", "CPU")):
        save, load, sha = (statistics.median(x[k] for x in xs) for xs in (saves, loads, hashes))
        print(f"{clock}: save {save:.2f}s, load {load:.2f}s (both with SHA-256); SHA-256 of "
              f"both files {sha:.2f}s ({size / sha / 1e9:.2f} GB/s) = {sha / save:.0%} of a "
              f"save, {sha / load:.0%} of a load")  # fmt: skip


if __name__ == "__main__":
    main()
