"""The `curate` stage: every dataset in `data.datasets`, from sources to a saved DatasetDict plus a data card.

    <stage dir>/<name>/                the DatasetDict (train, validation), `save_to_disk`; what training reads
    <stage dir>/quarantine/<name>/<step>/*.jsonl   every dropped row, with its step and reason
    <stage dir>/cards/<name>.md|.json|.png        the data card, <name>.thinking.png where rows think (also copied to
                                                  data.cards_dir, e.g. data_cards/)
    <stage dir>/work/<name>/           intermediate datatrove outputs and logs
    <stage dir>/teacher/<name>/<source>/   a teacher source's cached answers and this run's samples (teacher.py)

Two datatrove passes run on its LocalPipelineExecutor: pass 1 (per row, parallel over `data.workers` tasks) reads,
adapts, cleans, filters, decontaminates and computes dedup signatures; pass 2 (one task, in source order so the first
copy wins) drops exact and near duplicates with dictionary and LSH lookups. Then mixing (per-source weights, seeded)
and the train/validation split, streamed through memory-mapped Arrow. Nothing is lost: rows_in == rows_kept +
Σ rows_dropped[reason] is checked against the quarantine files themselves, and a mismatch fails the stage.
Same seed + same inputs => byte-identical dataset folder (its hash goes on the card).

The passes' readers and writer are in readers.py, the executors that run them (local, Ray, Slurm) in executors.py.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
from array import array
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from datatrove.data import Document

from llmstack.config.data import DatasetSpec, ExecutorSpec
from llmstack.data.card import build_card, publish_card
from llmstack.data.executors import CurationError, execute, preflight
from llmstack.data.formats import has_tools
from llmstack.data.readers import OrderedReader, SourceReader, iter_docs, jsonl_writer, read_jsonl
from llmstack.data.sources import describe, fetch_source
from llmstack.data.stats import ThinkingStats, ToolStats
from llmstack.data.teacher import LocalAnswerer, fetch_teacher
from llmstack.data.thinking import has_thinking

log = logging.getLogger("llmstack")


# ---------------------------------------------------------------- one dataset


# The Slurm jobs' last step (`llmstack curate --slurm-collect`, see slurm_jobs) sets this: the two passes already ran
# in Slurm jobs, so the curate stage checks they all completed and does only what comes after them.
FROM_SLURM_ENV = "LLMSTACK_CURATE_FROM_SLURM"


def _passes(name: str, spec: DatasetSpec, stage_dir: Path, tokenizer: Path | None,
            eval_items: Iterable[tuple[str, str, str]] | None, fresh: bool, preload: bool,
            answer_locally: LocalAnswerer | None = None):
    """Pass 1 and pass 2 of one dataset as datatrove pipelines (whichever executor runs them), plus what the rest of
    the stage needs. `fresh`: clear the dataset's earlier work, quarantine and output first. `answer_locally`: what
    runs a local teacher source (teacher.py)."""
    from llmstack.data import filters as F
    from llmstack.data.decontam import DecontaminationFilter, NGramIndex
    from llmstack.data.dedup import DedupSignatures, ExactDedupFilter, NearDedupFilter
    from llmstack.data.gopher import GopherQuality, GopherRepetition

    work, quarantine = stage_dir / "work" / name, stage_dir / "quarantine" / name
    if fresh:
        for d in (work, quarantine, stage_dir / name):
            shutil.rmtree(d, ignore_errors=True)
    fspec = spec.filters

    log.info("curate %s: fetching %d source(s)", name, len(spec.sources))
    fetched = [fetch_teacher(s, stage_dir / "teacher" / name / s.name, fspec.max_chars, answer_locally)
               if s.teacher else fetch_source(s) for s in spec.sources]

    # ---- pass 1: read, adapt, clean, filter (parallel over tasks)
    q = lambda step: jsonl_writer(quarantine / step)  # noqa: E731
    steps: list = [SourceReader(fetched, spec, quarantine / "read", work / "counts"),
                   F.MaxCharsFilter(fspec.max_chars, exclusion_writer=q("max_chars")),
                   *([F.ThinkingLengthFilter(fspec.max_thinking_chars, exclusion_writer=q("thinking_length"))]
                     if fspec.max_thinking_chars else []),
                   F.CleanRows(fspec.fix_unicode, fspec.redact_pii),
                   F.NonEmptyFilter(exclusion_writer=q("non_empty"))]
    token_length = None
    if tokenizer is not None:
        token_length = F.TokenLengthFilter(str(tokenizer), fspec.min_tokens, fspec.max_tokens,
                                           exclusion_writer=q("token_length"))
        steps.append(token_length)
    if fspec.gopher_repetition if fspec.gopher_repetition is not None else spec.schema_ == "text":
        steps.append(GopherRepetition(language=F.WORDS, exclusion_writer=q("gopher_repetition")))
    if fspec.gopher_quality if fspec.gopher_quality is not None else spec.schema_ == "text":
        steps.append(GopherQuality(language=F.WORDS, exclusion_writer=q("gopher_quality")))
    if fspec.languages:
        steps.append(F.LangIdFilter(fspec.languages, fspec.language_min_chars, exclusion_writer=q("language")))
    if fspec.blocklist:
        steps.append(F.BlocklistFilter(fspec.blocklist, exclusion_writer=q("blocklist")))
    index = None
    if spec.decontaminate.enabled and eval_items is not None:
        # Per row, so it runs in the parallel pass; the card still lists every matched benchmark item.
        index = NGramIndex(eval_items, spec.decontaminate.n)
        steps.append(DecontaminationFilter(index, exclusion_writer=q("decontaminate")))
    if spec.dedup.exact or spec.dedup.near:
        steps.append(DedupSignatures(spec.dedup.num_perm, spec.dedup.shingle_words, near=spec.dedup.near,
                                     exact=spec.dedup.exact))
    steps.append(jsonl_writer(work / "pass1"))
    # Load models once here: forked workers inherit them instead of each loading their own.
    if preload and token_length is not None:
        token_length.preload(chat_rows=spec.schema_ != "text")
    if preload and fspec.languages:
        F.langid_model()
    pass1 = steps

    # ---- pass 2: exact and near dedup, in source order (the first copy wins)
    steps = [OrderedReader(work / "pass1")]
    if spec.dedup.exact:
        steps.append(ExactDedupFilter(exclusion_writer=q("exact_dedup")))
    if spec.dedup.near:
        steps.append(NearDedupFilter(spec.dedup.near_threshold, spec.dedup.num_perm, spec.dedup.shingle_words,
                                     exclusion_writer=q("near_dedup")))
    steps.append(jsonl_writer(work / "kept"))
    return pass1, steps, work, quarantine, fetched, index


def curate_dataset(name: str, spec: DatasetSpec, stage_dir: Path, tokenizer: Path | None, seed: int,
                   eval_items: Iterable[tuple[str, str, str]] | None = None, eval_suites: list[str] | None = None,
                   workers: int = 1, executor: ExecutorSpec | None = None,
                   answer_locally: LocalAnswerer | None = None) -> dict:
    """Curate one dataset. Returns the card dict (also written as cards/<name>.json). `answer_locally` runs a local
    teacher source's batch (the curate stage passes llmstack.serve's batch engine; teacher.py says why)."""
    executor = executor or ExecutorSpec()
    from_slurm = executor.type == "slurm"
    if from_slurm and not os.environ.get(FROM_SLURM_ENV):
        raise CurationError("data.executor is slurm: submit the curation jobs with `llmstack curate RECIPE --slurm` "
                            "(add --dry-run to only write their scripts); their last job records the curated "
                            "datasets, and `llmstack run` then goes on from them")
    pass1, pass2, work, quarantine, fetched, index = _passes(name, spec, stage_dir, tokenizer, eval_items,
                                                             fresh=not from_slurm, preload=not from_slurm,
                                                             answer_locally=answer_locally)
    log.info("curate %s: pass 1 (read, clean, filter, decontaminate, signatures) on %d task(s), %s executor", name,
             workers, executor.type)
    execute(pass1, work, "pass1", workers, executor)
    log.info("curate %s: pass 2 (dedup)", name)
    execute(pass2, work, "pass2", 1, executor)
    return _finish(name, spec, stage_dir, tokenizer, seed, eval_suites, work, quarantine, fetched, index)


def _finish(name: str, spec: DatasetSpec, stage_dir: Path, tokenizer: Path | None, seed: int,
            eval_suites: list[str] | None, work: Path, quarantine: Path, fetched: list, index) -> dict:
    """After the passes: mixing, split, save, reconciliation against the quarantine files, and the data card."""
    for d in (quarantine / "mixing", stage_dir / name):  # an earlier attempt at this part (a re-run collect job)
        shutil.rmtree(d, ignore_errors=True)
    # ---- mixing and split, streamed: memory stays flat however many rows were kept
    kept_files = read_jsonl(work / "kept")
    per_source_kept, tool_rows, thinking_rows, provenance = Counter(), False, False, False
    for d in (d for p in kept_files for d in iter_docs(p)):
        per_source_kept[d["metadata"]["source"]] += 1
        tool_rows = tool_rows or has_tools(d["metadata"]["row"])
        thinking_rows = thinking_rows or has_thinking(d["metadata"]["row"])
        provenance = provenance or "provenance" in d["metadata"]
    plan = mix_plan(per_source_kept, spec, seed)
    feats = features(spec.schema_, tools=tool_rows, thinking=thinking_rows, provenance=provenance)
    tool_stats = ToolStats() if tool_rows else None
    thinking_stats = ThinkingStats(tokenizer)
    lengths, kept_by_source, cleaning = array("l"), Counter(), Counter()
    seen: Counter = Counter()
    with jsonl_writer(quarantine / "mixing") as unused, open(work / "selected.jsonl", "w") as selected:
        for d in (d for p in kept_files for d in iter_docs(p)):
            src = d["metadata"]["source"]
            seen[src] += 1
            if plan is not None and seen[src] - 1 not in plan[src]:
                unused.write(Document(text=d["text"], id=d["id"], metadata={
                    **d["metadata"], "filter_reason": "mixing: not sampled (max_rows cap)"}))
                continue
            row = {**d["metadata"]["row"], "metadata": d["metadata"].get("provenance")}
            selected.write(json.dumps({k: row.get(k, []) for k in feats}, ensure_ascii=False) + "\n")
            if tool_stats is not None:
                tool_stats.add(row)
            thinking_stats.add(row)
            lengths.append(d["metadata"].get("n_tokens", 0))
            kept_by_source[src] += 1
            cleaning.update(d["metadata"].get("cleaned", {}))
    out = stage_dir / name
    sizes, content_hash = save(work / "selected.jsonl", feats, out, spec.validation_fraction, seed, work / "hf")

    # ---- reconciliation: counted from the files, not from counters that could agree with themselves
    per_source_in: Counter = Counter()
    for p in (work / "counts").glob("*.json"):
        per_source_in.update(json.loads(p.read_text()))
    rows_in = sum(per_source_in.values())
    dropped = quarantine_counts(quarantine)
    n_kept = sum(sizes.values())
    n_dropped = sum(dropped.values())
    if rows_in != n_kept + n_dropped:
        raise CurationError(f"dataset '{name}': rows_in {rows_in} != kept {n_kept} + dropped {n_dropped} "
                            f"({dict(dropped)}): rows were lost; see {quarantine}")
    log.info("curate %s: %d in, %d kept, %d quarantined", name, rows_in, n_kept, n_dropped)

    return build_card(name=name, spec=spec, sources=[describe(f) for f in fetched], per_source_in=per_source_in,
                      kept_by_source=kept_by_source, rows_in=rows_in, dropped=dropped, sizes=sizes,
                      lengths=lengths, cleaning=cleaning, content_hash=content_hash, dataset_dir=out,
                      quarantine_dir=quarantine, index=index, eval_suites=eval_suites or [], tokenizer=tokenizer,
                      seed=seed, card_dir=stage_dir / "cards",
                      tools=tool_stats.summary(dropped) if tool_stats is not None else None,
                      thinking=thinking_stats.summary(dropped), thinking_lengths=thinking_stats.lengths)


def quarantine_counts(quarantine: Path) -> Counter:
    """(step, reason) -> rows, read back from the quarantine files."""
    counts: Counter = Counter()
    for step_dir in sorted(p for p in quarantine.iterdir() if p.is_dir()) if quarantine.exists() else []:
        for path in step_dir.glob("*.jsonl"):
            for d in iter_docs(path):
                counts[(step_dir.name, d.get("metadata", {}).get("filter_reason") or "dropped")] += 1
    return counts


def mix_plan(per_source: Counter, spec: DatasetSpec, seed: int) -> dict[str, set[int]] | None:
    """Which kept rows of each source to use: per-source weighted, seeded sampling down to `max_rows`.
    None: no cap (or under it), every kept row is used."""
    total = sum(per_source.values())
    if not spec.max_rows or total <= spec.max_rows:
        return None
    weights = {s.name: s.weight for s in spec.sources}
    quota = {s.name: 0 for s in spec.sources}
    left = spec.max_rows
    # Water-filling: each round shares what is left by weight (largest remainder) among sources that still have
    # rows; a source that runs out hands its share to the others in the next round.
    while left > 0:
        open_ = [s for s in quota if quota[s] < per_source.get(s, 0)]
        if not open_:
            break
        total_w = sum(weights[s] for s in open_)
        exact = {s: left * weights[s] / total_w for s in open_}
        share = {s: int(exact[s]) for s in open_}
        for s in sorted(open_, key=lambda s: exact[s] - share[s], reverse=True)[: left - sum(share.values())]:
            share[s] += 1
        for s in open_:
            take = min(share[s], per_source[s] - quota[s])
            quota[s] += take
            left -= take
    rng = random.Random(seed)
    return {s: set(rng.sample(range(per_source.get(s, 0)), quota[s])) for s in quota}


def features(schema: str, tools: bool = False, thinking: bool = False, provenance: bool = False):
    """The saved columns. Tool conversations keep each message and tool spec as JSON (datasets' `Json` feature):
    call arguments and schemas are free-form objects that Arrow structs would widen with nulls. Where any row thinks,
    turns have a `reasoning_content` column too (null on turns without a trace); where any row came from a teacher,
    a `metadata` column holds how (null for rows of other sources)."""
    from datasets import Features, Json, List, Value

    turn = {"role": Value("string"), "content": Value("string")}
    if thinking:
        turn["reasoning_content"] = Value("string")
    meta = {"metadata": Json()} if provenance else {}
    if schema == "messages" and tools:
        return Features({"messages": List(Json()), "tools": List(Json()), **meta})
    if schema == "messages":
        return Features({"messages": List(turn), **meta})
    if schema == "preference":
        return Features({"prompt": List(turn), "chosen": List(turn), "rejected": List(turn)})
    if schema == "unpaired":
        return Features({"prompt": List(turn), "completion": List(turn), "label": Value("bool")})
    return Features({"text": Value("string")})


def save(selected: Path, feats, out: Path, validation_fraction: float, seed: int, cache: Path
         ) -> tuple[dict[str, int], str]:
    """JSON lines -> shuffled train/validation DatasetDict on disk. datasets reads and shuffles through memory-mapped
    Arrow, so this stays flat in memory too. The fingerprint and info are content-derived (no paths), so the same
    rows and seed give a byte-identical folder; returns the split sizes and the folder's sha256."""
    import datasets

    n = sum(1 for _ in open(selected, "rb"))
    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # our own log line says what was saved
    try:
        return _save(selected, feats, out, validation_fraction, seed, cache, n)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _save(selected: Path, feats, out: Path, validation_fraction: float, seed: int, cache: Path, n: int):
    import hashlib

    import datasets

    from llmstack.runs import sha256_file, sha256_path

    if n:
        ds = datasets.Dataset.from_json(str(selected), features=feats, cache_dir=str(cache))
    else:  # from_json cannot read an empty file; an empty dataset still has the schema's columns
        ds = datasets.Dataset.from_dict({k: [] for k in feats}, features=feats)
    n_val = round(n * validation_fraction)
    if validation_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    if n_val:
        parts = ds.train_test_split(test_size=n_val, shuffle=True, seed=seed)
        splits = {"train": parts["train"], "validation": parts["test"]}
    else:
        splits = {"train": ds.shuffle(seed=seed), "validation": ds.select([])}
    base = hashlib.sha256(f"{sha256_file(selected)}:{seed}:{n_val}".encode()).hexdigest()
    for name, part in splits.items():
        part._fingerprint = hashlib.sha256(f"{base}:{name}".encode()).hexdigest()[:16]
        part._info = datasets.DatasetInfo(features=feats)
    datasets.DatasetDict(splits).save_to_disk(str(out), num_shards={k: 1 for k in splits})
    return {k: len(v) for k, v in splits.items()}, sha256_path(out)


# ---------------------------------------------------------------- the stage


def suites_for(recipe, spec: DatasetSpec) -> list[str]:
    if spec.decontaminate.suites is not None:
        return spec.decontaminate.suites
    return [recipe.eval.suite] if recipe.eval else []


def eval_items_for(suites: list[str]) -> list[tuple[str, str, str]] | None:
    if not suites:
        return None
    from llmstack.data.decontam import eval_texts

    return [item for s in suites for item in eval_texts(s)]


def curate_recipe(recipe, stage_dir: Path, tokenizer: Path | None, only: list[str] | None = None,
                  answer_locally: LocalAnswerer | None = None) -> dict[str, dict]:
    preflight(recipe.data.executor)
    cards = {}
    for name, spec in recipe.data.datasets.items():
        if only and name not in only:
            continue
        suites = suites_for(recipe, spec) if spec.decontaminate.enabled else []
        cards[name] = curate_dataset(name, spec, stage_dir, tokenizer, recipe.seed, eval_items_for(suites), suites,
                                     workers=recipe.data.workers, executor=recipe.data.executor,
                                     answer_locally=answer_locally)
        if recipe.data.cards_dir:
            publish_card(stage_dir / "cards", Path(recipe.data.cards_dir) / recipe.name, name)
    return cards


def slurm_jobs(recipe, stage_dir: Path, tokenizer: Path | None, collect: str, workdir: Path,
               answer_locally: LocalAnswerer | None = None) -> list[Path]:
    """Write the Slurm jobs that curate the recipe's datasets on datatrove's SlurmPipelineExecutor: per dataset,
    pass 1 as an array job of `data.workers` tasks, pass 2 (one task) after it; after all of them one job that runs
    `collect` in `workdir` (`llmstack curate --slurm-collect`: checks every task completed, then mixes, splits, writes
    the cards and records the stage, as the local executor's run would). Each pass's folder gets what datatrove's
    own launch writes (executor.pik, ranks_to_run.json, launch_script.slurm: `launch_pickled_pipeline` runs the
    task of its SLURM_ARRAY_TASK_ID); submit.sh submits them, chained with `sbatch --dependency=afterok`.
    Returns [submit.sh, the job scripts...]. The stage folder must be on a filesystem every node mounts."""
    import copy
    import shlex

    import dill
    from datatrove.executor import SlurmPipelineExecutor

    ex = recipe.data.executor
    stage_dir = stage_dir.resolve()  # the jobs run elsewhere: every path they hold is absolute
    folder = stage_dir / "slurm"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env_command = ex.env_command or f"source {Path(sys.prefix) / 'bin' / 'activate'}"
    sbatch_args = {"mem-per-cpu": f"{int(ex.mem_per_cpu_gb * 1024)}M", **ex.sbatch_args}
    common = dict(time=ex.time, partition=ex.partition, cpus_per_task=ex.cpus_per_task, qos=ex.qos,
                  env_command=env_command, sbatch_args=sbatch_args, skip_completed=True)
    scripts, submit, last = [], [], []
    for name, spec in recipe.data.datasets.items():
        suites = suites_for(recipe, spec) if spec.decontaminate.enabled else []
        pass1, pass2, work, *_ = _passes(name, spec, stage_dir, tokenizer, eval_items_for(suites), fresh=True,
                                         preload=False, answer_locally=answer_locally)
        after = None
        for tag, steps, tasks in (("pass1", pass1, recipe.data.workers), ("pass2", pass2, 1)):
            sx = SlurmPipelineExecutor(steps, tasks=tasks, job_name=f"curate-{name}-{tag}",
                                       logging_dir=str(work / f"logs_{tag}"),
                                       slurm_logs_folder=str(work / f"slurm_logs_{tag}"), **common)
            if tasks > sx.max_array_size:
                raise CurationError(f"data.workers {tasks} is more than one Slurm array holds ({sx.max_array_size})")
            ranks = sx.get_incomplete_ranks()
            with sx.logging_dir.open("executor.pik", "wb") as f:  # what SlurmPipelineExecutor.launch_job writes
                dill.dump(copy.deepcopy(sx), f, fmode=dill.CONTENTS_FMODE)
            sx.save_executor_as_json()
            with sx.logging_dir.open("ranks_to_run.json", "w") as f:
                json.dump(ranks, f)
            script = Path(sx.logging_dir.resolve_paths("launch_script.slurm"))
            script.write_text(sx.get_launch_file_contents(
                sx.get_sbatch_args(len(ranks)),
                f"srun -l -n 1 launch_pickled_pipeline {sx.logging_dir.resolve_paths('executor.pik')}"))
            scripts.append(script)
            var = f"{name.replace('-', '_').replace('.', '_')}_{tag}"
            dep = f" --dependency=afterok:${after}" if after else ""
            submit.append(f'{var}=$(jobid --export=ALL,RUN_OFFSET=0{dep} "{script}")')
            after = var
        last.append(after)
    collect_job = folder / "collect.slurm"
    collect_job.write_text(sx.get_launch_file_contents(
        {"cpus-per-task": 1, "partition": ex.partition, "job-name": "curate-collect", "time": ex.time,
         "output": str(folder / "collect-%j.out"), **({"qos": ex.qos} if ex.qos else {}), **sbatch_args},
        f"cd {shlex.quote(str(workdir))} && {collect}"))
    deps = ":".join(f"${v}" for v in last)
    (folder / "submit.sh").write_text(
        "#!/bin/bash\n# Submit llmstack's curation jobs (written by `llmstack curate --slurm`): per dataset pass 1 "
        f"(array) then pass 2, then collect.\nset -euo pipefail\ncd {shlex.quote(str(workdir))}  # the jobs start "
        "where `llmstack curate --slurm` ran (relative paths in the recipe)\n"
        'jobid() { local out; out=$(sbatch --parsable "$@"); echo "${out%%;*}"; }\n'
        + "\n".join(submit) + f'\ncollect=$(jobid --dependency=afterok:{deps} "{collect_job}")\n'
        + 'echo "submitted: ' + " ".join(f"{v}=${v}" for v in last) + ' collect=$collect"\n')
    (folder / "submit.sh").chmod(0o755)
    return [folder / "submit.sh", *scripts, collect_job]
