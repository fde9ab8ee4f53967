"""Goodput under SLOs: adaptive batching (--slo-ttft-ms/--slo-tpot-ms) against fixed
token budgets and batch caps, on the same bursty workload, one run.

For each setting: start `deepserve serve`, run `deepserve bench sweep` over the rates
(gamma arrivals with --burstiness, random prompts), read goodput (requests/s meeting
both SLOs) per rate, stop it. Then a table and a plot of goodput against rate.

    .venv/bin/python benchmarks/slo_goodput.py --out results/slo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

FIXED = [(2048, 64), (512, 32), (256, 16), (128, 8), (64, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[2, 4, 6, 8])
    ap.add_argument("--burstiness", type=float, default=0.3)
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--slo-ttft-ms", type=float, default=1500)
    ap.add_argument("--slo-tpot-ms", type=float, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/slo")
    args = ap.parse_args()
    from server_utils import ServerProcess

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = [("adaptive", ["--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms",
                              str(args.slo_tpot_ms)])]
    settings += [(f"fixed {t} tok / {s} seqs", ["--max-num-batched-tokens", str(t),
                                                  "--max-num-seqs", str(s)])
                 for t, s in FIXED]
    table: dict[str, dict[float, float]] = {}
    for label, flags in settings:
        srv = ServerProcess("--num-threads", str(args.threads), *flags,
                            log_dir=Path(tempfile.mkdtemp(prefix="deepserve-slo-")))
        runs = subprocess.run(
            [sys.executable, "-m", "deepserve.cli", "bench", "sweep", "--base-url", srv.url,
             "--rates", *map(str, args.rates), "--burstiness", str(args.burstiness),
             "--workload", "random", "--input-len", str(args.input_len), "--output-len",
             str(args.output_len), "--ignore-eos", "--num-requests", str(args.num_requests),
             "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
             "--label", label, "--out", str(out / label.replace(" ", "_").replace("/", ""))],
            capture_output=True, text=True, timeout=1200)
        srv.stop()
        if runs.returncode:
            raise SystemExit(f"{label}: bench failed:\n{runs.stderr[-3000:]}")
        sweep = sorted((out / label.replace(" ", "_").replace("/", "")).glob("sweep-*.json"))[-1]
        data = json.loads(sweep.read_text())
        table[label] = {r["meta"]["request_rate"]: r["summary"]["goodput_requests_per_s"]
                        for r in data}
        print(label, {k: round(v, 2) for k, v in table[label].items()}, flush=True)
    lines = ["| setting | " + " | ".join(f"{r:g} req/s" for r in args.rates) + " |",
             "|---|" + "---:|" * len(args.rates)]
    for label, row in table.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[r]:.2f}" for r in args.rates) + " |")
    md = "\n".join(lines)
    (out / "goodput.md").write_text(md + "\n")
    (out / "goodput.json").write_text(json.dumps({"args": vars(args), "goodput": table},
                                                 indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, row in table.items():
        ax.plot(args.rates, [row[r] for r in args.rates], "o-",
                lw=3 if label == "adaptive" else 1.2, label=label)
    ax.set_xlabel(f"offered load (requests/s, burstiness {args.burstiness:g})")
    ax.set_ylabel("goodput (requests/s meeting both SLOs)")
    ax.set_title(f"Goodput at TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= "
                 f"{args.slo_tpot_ms:g} ms")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "goodput.png", dpi=100)
    print(md)


if __name__ == "__main__":
    main()
