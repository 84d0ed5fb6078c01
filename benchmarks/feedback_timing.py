"""Is the job's own slim/dense timing (measured feedback) biased against a fresh-process re-timing?

For one finished run: (1) ``Feedback.ratio`` on the run's final widths, three times; (2) the same
after 20 training steps on 2 threads in this process (as inside a job); (3) the dense model, a
slim network cut from the dense weights and the run's saved ``slim.pt``, interleaved together,
5 x 15 rounds. Prints ratios; compare them with the record's ``prune_log[-1].measured_ms`` and
with ``halp remeasure``. Run it on a quiet machine.

    python benchmarks/feedback_timing.py RUN_DIR DENSE_CKPT --model halp:resnet20 --input 1 28 28
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from halp.export import load_module
from halp.graph import ChannelGraph
from halp.latency.backends import Setting, get_backend
from halp.latency.feedback import Feedback
from halp.latency.timing import Protocol, measure
from halp.masks import ChannelMasks
from halp.models import create_model
from halp.slim import slim_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run directory with result.json and slim.pt")
    ap.add_argument("dense", type=Path, help="the dense checkpoint the run was pruned from")
    ap.add_argument("--model", default="halp:resnet20")
    ap.add_argument("--input", type=int, nargs=3, default=[1, 28, 28])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    rec = json.loads((args.run / "result.json").read_text())
    widths = rec["prune_log"][-1]["widths"]
    print("record: in-job ratio", rec["prune_log"][-1].get("measured_ms", 0) / rec["budget"]["dense"])
    model = create_model(args.model, num_classes=args.classes, in_chans=args.input[0])
    model.load_state_dict(torch.load(args.dense, map_location="cpu", weights_only=False)["model"])
    graph = ChannelGraph.build(model.eval(), tuple(args.input))
    fb = Feedback(Setting(batch=args.batch, threads=1))
    print("feedback, fresh process:", [round(fb.ratio(graph, widths), 4) for _ in range(3)], flush=True)

    torch.manual_seed(0)
    torch.set_num_threads(2)
    trained = graph.model.train()
    opt = torch.optim.SGD(trained.parameters(), lr=1e-3)
    x, y = torch.randn(128, *args.input), torch.randint(0, args.classes, (128,))
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(trained(x), y).backward()
        opt.step()
    trained.eval()
    print("feedback, after 20 training steps on 2 threads:", [round(fb.ratio(graph, widths), 4) for _ in range(3)])

    cut = slim_model(graph, ChannelMasks.prefix(graph, widths)).eval()
    saved = load_module(args.run / "slim.pt").eval()
    setting = Setting(batch=args.batch, threads=1)
    x = torch.randn(args.batch, *args.input)
    with get_backend(setting) as backend, torch.no_grad():
        runners = [backend.prepare(graph.model, x), backend.prepare(cut, x), backend.prepare(saved, x)]
        ratios = np.array([[t.ms / ts[0].ms for t in ts[1:]] for ts in
                           (measure(backend, runners, Protocol(rounds=15, sample_ms=50.0, seed=r)) for r in range(5))])
    print("interleaved, 5 x 15 rounds: cut-from-dense", np.median(ratios[:, 0]).round(4),
          "saved slim.pt", np.median(ratios[:, 1]).round(4), "(ranges", ratios.min(0).round(3), ratios.max(0).round(3), ")")


if __name__ == "__main__":
    main()
