"""OpenMP's idle threads spinning or sleeping: the same work with
  (spin)     libgomp's own default, what llmstack leaves in place: threads busy-wait ~300,000 spins after each parallel
             region (GOMP_SPINCOUNT=300000: libgomp's own spin count when nothing is set), and
  (passive)  OMP_WAIT_POLICY=PASSIVE, idle threads sleep at once: what the test suite sets (tests/conftest.py),
each workload in fresh processes, the two settings alternated for --rounds rounds. The workloads:
  suite   a fixed set of test files on two pytest-xdist workers, as `make test` runs them: engines, servers, trainers
          and clients of two tests share the cores (wall time; CPU time of the processes it waited for; all pass)
  engine  vLLM-CPU (executor uni, what `auto` picks on small machines) alone with its front end: tokens/s for one
          request and for --concurrency at once (scripts/bench_vllm_cpu.py's measurement)
  train   one process alone training SmolLM2-135M (float32, batch 4 x 512, AdamW): tokens/s
Prints each round, then the medians and the ratios passive vs spin; writes the record `openmp`.

    .venv/bin/python scripts/bench_openmp.py                       # all three, 2 rounds (~25 min on 2 cores)
    .venv/bin/python scripts/bench_openmp.py --workloads train engine --rounds 1 --model tiny   # smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchrecord

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"spin": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
SUITE = ["tests/test_eval_parity.py", "tests/test_train_kinds.py", "tests/test_quant.py", "tests/test_generate.py"]
WORKLOADS = ("suite", "engine", "train")


def environment(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **SETTINGS[setting]}


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def suite(setting: str, args) -> dict:
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadfile", "--no-loadscope-reorder",
                           "-q", "-p", "no:cacheprovider", *args.files], cwd=REPO, env=environment(setting),
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"wall_s": wall, "cpu_s": children_cpu_s() - cpu0, "passed": done.returncode == 0, "summary": last}


def child(cmd: list[str], setting: str) -> dict:
    """A measurement in a fresh process that loads libgomp under `setting`; it writes its result as JSON to the
    path given after --child-out."""
    with tempfile.TemporaryDirectory(prefix="bench_openmp_") as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([*cmd, "--child-out", str(out)], check=True, env=environment(setting),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(out.read_text())


def engine(setting: str, args) -> dict:
    res = child([sys.executable, str(REPO / "scripts" / "bench_vllm_cpu.py"), "--child", "uni", "--model",
                 args.model_path, "--concurrency", str(args.concurrency), "--max-tokens", "64"], setting)
    return {"tok_s_c1": res["tok_s_c1"], "tok_s": res["tok_s"], "ttft_p50_s": res["ttft_p50_s"]}


def train(setting: str, args) -> dict:
    return child([sys.executable, __file__, "--train-child", args.model_path], setting)


def train_child(model: str, out: Path, steps: int = 4) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    x = torch.randint(0, m.config.vocab_size, (4, 512), generator=torch.Generator().manual_seed(0))
    for i in range(steps + 2):  # two warm-up steps, not counted
        if i == 2:
            t0 = time.perf_counter()
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    out.write_text(json.dumps({"tok_s": steps * x.numel() / (time.perf_counter() - t0)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=2, help="runs per setting and workload, alternated")
    ap.add_argument("--files", nargs="+", default=SUITE, help="the suite workload's test files")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model folder, packaged name, or 'tiny'")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--train-child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    benchrecord.add_argument(ap)
    args = ap.parse_args()
    if args.train_child:
        return train_child(args.train_child, args.child_out)

    work = tempfile.TemporaryDirectory(prefix="bench_openmp_")  # removed (weakref.finalize) when the run ends
    args.model_path = str(benchrecord.model(args.model, work.name))
    measure = {"suite": suite, "engine": engine, "train": train}
    runs = {w: {s: [] for s in SETTINGS} for w in args.workloads}
    for r in range(args.rounds):
        for w in args.workloads:
            for s in SETTINGS:
                res = measure[w](s, args)
                runs[w][s].append(res)
                shown = "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())
                print(f"  round {r + 1} {w:6} {s:7}: {shown}", flush=True)

    tables, ratios = {}, {}
    for w, by in runs.items():
        keys = [k for k, v in by["spin"][0].items() if isinstance(v, float)]
        med = {s: {k: statistics.median(x[k] for x in by[s]) for k in keys} for s in SETTINGS}
        tables[w] = [{"setting": s, **{k: round(v, 3) for k, v in med[s].items()}, "rounds": len(by[s]),
                      **({"all_passed": all(x["passed"] for x in by[s])} if w == "suite" else {})} for s in SETTINGS]
        for k in keys:
            ratios[f"{w}_{k}_passive_vs_spin"] = med["passive"][k] / med["spin"][k]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    benchrecord.write("openmp", results=args.results_dir,
                      settings={"model": Path(args.model_path).name, "rounds": args.rounds,
                                "concurrency": args.concurrency, "suite_files": args.files,
                                "workloads": args.workloads},
                      figures=tables, ratios={k: round(v, 3) for k, v in ratios.items()})


if __name__ == "__main__":
    main()
