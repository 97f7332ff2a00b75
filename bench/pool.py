"""Benchmark of the experience pool, and the calibration of the abstraction thresholds.

    .venv/bin/python bench/pool.py [--sizes 10000,100000] [--queries 200] [--skip-calibration]
                                   [--out bench/results/pool.json]

Data: real GSM8K train questions (shared data folder) embedded with the bundled all-MiniLM-L6-v2 (the embeddings
are cached under `<lanpo cache>/bench/`). Each stored row is a
realistic rollout: the question, the GSM8K reference solution padded to ~1,000 characters (a 256-token
response), reward 0/1 at random (50 %), G=8 rollouts per problem per step.

1. **ingest**: rows/s of `write_step` with B=8 problems x G=8 rollouts per step (64 rows, one version each),
   (a) embedding excluded (vectors already cached) and (b) embedding included (8 new problems per step, embedded
   in the write); plus bulk rows/s (5,000-row writes) used to build the large tables.
2. **query**, at each size: latency p50/p95 of `similar_experiences` (top-4, run filter, reward > 0, other
   problems only, min_similarity 0.6, duplicate_similarity 0.9) on the pool's in-memory problem-level index (exact),
   plus the time to load that index from the table; `earlier_attempts` latency for 8 problems; disk bytes per
   1,000 rows.
3. **calibration** of `abstraction.min_similarity` / `duplicate_similarity` for MiniLM on GSM8K train (all 7,473
   questions), MATH-500 and the 1-digit arithmetic set: random-pair percentiles, k-th neighbour similarities,
   coverage (share of problems with >= 1 / >= 4 neighbours in [t, 0.9)) in the full pool and in a 512-problem pool
   (early training), a method-relevance proxy (cosine of number-masked GSM8K reference solutions, by question
   similarity band), MATH-500 same-subject precision, and how often a pair's other question states this problem's
   gold answer (the near-duplicate leak).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from lanpo_core.models import cache_dir, load_embedder  # noqa: E402
from lanpo_core.pool import ExperiencePool, RolloutRecord  # noqa: E402
from lanpo_core.verify import answer_in_text  # noqa: E402

B, G = 8, 8
SHARED = Path(os.environ.get("LANPO_SHARED_DATA", REPO.parent / "shared" / "data"))
MIN_SIM, DUP_SIM, TOP_K = 0.6, 0.9, 4


def load_gsm8k(split: str = "train") -> list[dict]:
    rows = [json.loads(x) for x in (SHARED / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["id"] = f"gsm8k-{split}-{i}"
        r["gold"] = r["answer"].split("####")[-1].strip().replace(",", "")
    return rows


def cached_embeddings(name: str, texts: list[str], embedder) -> np.ndarray:
    path = cache_dir() / "bench" / f"{name}-{len(texts)}-minilm.npy"
    if path.is_file():
        return np.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    vecs = embedder.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False).astype(np.float32)
    print(f"  embedded {len(texts)} {name} texts in {time.perf_counter() - started:.1f}s (cached at {path})")
    np.save(path, vecs)
    return vecs


def response_for(row: dict, i: int) -> str:
    text = row["answer"]
    pad = " Let me double-check each step of the computation once more before finishing."
    while len(text) < 1000:
        text += pad
    return f"Attempt {i}. " + text[:1000]


def records(rows: list[dict], rng: random.Random) -> list[RolloutRecord]:
    out = []
    for r in rows:
        for i in range(G):
            out.append(RolloutRecord(r["id"], r["question"], i, "plain", response_for(r, i),
                                     float(rng.random() < 0.5), r["gold"], prompt_tokens=120,
                                     completion_tokens=256))
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


# ------------------------------------------------------------------------------------------------ ingest
def bench_ingest(rows, vectors, embedder, workdir: Path) -> dict:
    rng = random.Random(0)
    out = {}
    pool = ExperiencePool(workdir / "ingest-a", "bench", embedder=embedder, optimize_every=0)
    pool.remember_embeddings({r["id"]: v for r, v in zip(rows, vectors)})
    times = []
    for step in range(40):
        recs = records(rows[step * B:(step + 1) * B], rng)
        t = time.perf_counter()
        pool.write_step(step, recs)
        times.append(time.perf_counter() - t)
    out["step_rows"] = B * G
    out["rows_per_s_embedding_excluded"] = B * G * len(times) / sum(times)
    out["step_ms_p50_embedding_excluded"] = pct(times, 50)
    pool = ExperiencePool(workdir / "ingest-b", "bench", embedder=embedder, optimize_every=0)
    times = []
    for step in range(20):
        recs = records(rows[1000 + step * B:1000 + (step + 1) * B], rng)
        t = time.perf_counter()
        pool.write_step(step, recs)
        times.append(time.perf_counter() - t)
    out["rows_per_s_embedding_included"] = B * G * len(times) / sum(times)
    out["step_ms_p50_embedding_included"] = pct(times, 50)
    t = time.perf_counter()
    embedder.encode([r["question"] for r in rows[2000:2064]], batch_size=64, normalize_embeddings=True)
    out["embed_texts_per_s"] = 64 / (time.perf_counter() - t)
    return out


# ------------------------------------------------------------------------------------------------ query
def build_table(rows, vectors, size: int, workdir: Path) -> tuple[ExperiencePool, float]:
    rng = random.Random(1)
    pool = ExperiencePool(workdir / f"pool-{size}", "bench", optimize_every=0)
    pool.remember_embeddings({r["id"]: v for r, v in zip(rows, vectors)})
    # a second run in the same folder (10 % of the rows), so the run filter has work to do
    other = ExperiencePool(pool.uri, "other-run", optimize_every=0)
    other._vectors = pool._vectors
    per_step = 5000
    written, step, t = 0, 0, time.perf_counter()
    while written < size:
        n = min(per_step, size - written)
        chunk = []
        while len(chunk) < n:
            r = rows[rng.randrange(len(rows))]
            i = len(chunk) % G
            chunk.append(RolloutRecord(r["id"], r["question"], i, "plain", response_for(r, i),
                                       float(rng.random() < 0.5), r["gold"], prompt_tokens=120,
                                       completion_tokens=256))
        target = other if step % 10 == 9 else pool
        # uids must be unique per (run, step, problem, index): give each record its own index
        for k, rec in enumerate(chunk):
            rec.rollout_index = k
        target.write_step(step, chunk)
        written += n
        step += 1
    seconds = time.perf_counter() - t
    pool.optimize()
    return pool, size / seconds


def time_queries(pool, queries) -> tuple[list[float], list[list[str]]]:
    times, results = [], []
    kw = dict(top_k=TOP_K, min_similarity=MIN_SIM, duplicate_similarity=DUP_SIM)
    for r in queries[:5]:  # warm-up (file cache, index load)
        pool.similar_experiences(r["id"], r["question"], **kw)
    for r in queries:
        t = time.perf_counter()
        got = pool.similar_experiences(r["id"], r["question"], **kw)
        times.append(time.perf_counter() - t)
        results.append([e.problem_id for e in got])
    return times, results


def summary(times: list[float], results: list[list[str]]) -> dict:
    return {"p50_ms": pct(times, 50), "p95_ms": pct(times, 95), "queries": len(times),
            "mean_results": float(np.mean([len(x) for x in results]))}


def bench_size(rows, vectors, size: int, n_queries: int, workdir: Path) -> dict:
    print(f"  building {size} rows ...", flush=True)
    pool, bulk_rate = build_table(rows, vectors, size, workdir)
    rng = random.Random(2)
    stored = sorted({pid for pid in pool.table.search().where("run_id = 'bench'").select(["problem_id"])
                     .limit(None).to_arrow().column("problem_id").to_pylist()})
    by_id = {r["id"]: r for r in rows}
    queries = [by_id[pid] for pid in rng.sample(stored, min(n_queries, len(stored)))]
    res: dict = {"rows": size, "problems": len(stored), "bulk_rows_per_s": bulk_rate}
    res["disk_bytes_per_1k_rows"] = pool.table.stats()["total_bytes"] / size * 1000  # live data, compacted
    res["disk_bytes_per_1k_rows_with_history"] = pool.disk_bytes() / size * 1000  # + every old version
    # a fresh process-like pool object: the first query loads the run's in-memory index from the table
    fresh = ExperiencePool(pool.uri, "bench", optimize_every=0)
    fresh._vectors = {}
    t = time.perf_counter()
    fresh._index()
    res["memory_index_load_s"] = time.perf_counter() - t
    fresh.remember_embeddings({r["id"]: v for r, v in zip(rows, vectors)})  # query embeddings: cached, as in a run
    mem_t, mem_r = time_queries(fresh, queries)
    res["memory"] = summary(mem_t, mem_r)
    pids = [q["id"] for q in queries[:8]]
    t_att = []
    for _ in range(30):
        t = time.perf_counter()
        fresh.earlier_attempts(pids, 1, "most_recent")
        t_att.append(time.perf_counter() - t)
    res["earlier_attempts_8_problems"] = {"p50_ms": pct(t_att, 50), "p95_ms": pct(t_att, 95)}
    shutil.rmtree(pool.uri, ignore_errors=True)
    return res


# ------------------------------------------------------------------------------------------ calibration
def calibrate(rows, vectors, embedder) -> dict:
    out: dict = {}
    E = vectors
    n = len(E)
    S = E @ E.T
    np.fill_diagonal(S, -2.0)
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, n, 300_000), rng.integers(0, n, 300_000)
    keep = i != j
    rand = S[i[keep], j[keep]]
    out["gsm8k_random_pair_pct"] = {str(q): float(np.percentile(rand, q)) for q in (50, 90, 95, 99, 99.9)}
    top = -np.sort(-S, axis=1)[:, :4]
    out["gsm8k_nn1_pct"] = {str(q): float(np.percentile(top[:, 0], q)) for q in (10, 50, 90)}
    out["gsm8k_nn4_pct"] = {str(q): float(np.percentile(top[:, 3], q)) for q in (10, 50, 90)}
    sub = rng.choice(n, 512, replace=False)
    cov = {}
    for t in (0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8):
        full = ((S >= t) & (S < DUP_SIM)).sum(1)
        small = ((S[:, sub] >= t) & (S[:, sub] < DUP_SIM)).sum(1)
        cov[str(t)] = {"full_ge1": float(np.mean(full >= 1)), "full_ge4": float(np.mean(full >= 4)),
                       "pool512_ge1": float(np.mean(small >= 1)), "pool512_ge4": float(np.mean(small >= 4))}
    out["gsm8k_coverage"] = cov
    # near-duplicate leak: how often the other question of a pair states this problem's gold answer
    gold = [r["gold"] for r in rows]
    qs = [r["question"] for r in rows]
    leak = {}
    for lo, hi in ((0.95, 1.01), (0.9, 0.95), (0.85, 0.9), (0.8, 0.85), (0.7, 0.8), (0.6, 0.7), (-1.0, 0.6)):
        a, b = np.where((S >= lo) & (S < hi))
        if len(a) > 5000:
            k = rng.choice(len(a), 5000, replace=False)
            a, b = a[k], b[k]
        leak[f"[{lo},{hi})"] = {"pairs": int(len(a)),
                                "other_question_states_gold": float(np.mean([answer_in_text(gold[x], qs[y])
                                                                             for x, y in zip(a, b)]))}
    out["gsm8k_gold_in_other_question"] = leak
    # method relevance proxy: cosine of number-masked reference solutions, by question-similarity band
    idx = rng.choice(n, 1500, replace=False)
    mask = lambda s: re.sub(r"\d[\d,.]*", "N", re.sub(r"<<[^>]*>>", "", s.split("####")[0]))
    sol = cached_embeddings("gsm8k-train-masked-solutions-sample", [mask(rows[k]["answer"]) for k in idx], embedder)
    SQ, SS = E[idx] @ E[idx].T, sol @ sol.T
    iu = np.triu_indices(len(idx), 1)
    q, s = SQ[iu], SS[iu]
    out["gsm8k_solution_similarity_by_band"] = {"all": float(s.mean())}
    for lo, hi in ((0.0, 0.5), (0.5, 0.55), (0.55, 0.6), (0.6, 0.65), (0.65, 0.7), (0.7, 0.8), (0.8, 1.01)):
        m = (q >= lo) & (q < hi)
        out["gsm8k_solution_similarity_by_band"][f"[{lo},{hi})"] = float(s[m].mean()) if m.any() else None
    # MATH-500: same-subject precision and coverage
    m500 = [json.loads(x) for x in (SHARED / "math500" / "test.jsonl").read_text().splitlines()]
    M = cached_embeddings("math500-problems", [r["problem"] for r in m500], embedder)
    subj = np.array([r["subject"] for r in m500])
    SM = M @ M.T
    np.fill_diagonal(SM, -2.0)
    iu = np.triu_indices(len(M), 1)
    same = (subj[:, None] == subj[None, :])[iu]
    out["math500_random_pair_pct"] = {str(p): float(np.percentile(SM[iu], p)) for p in (50, 90, 99)}
    out["math500"] = {"base_same_subject": float(same.mean())}
    for t in (0.4, 0.5, 0.6, 0.7):
        sel = (SM[iu] >= t) & (SM[iu] < DUP_SIM)
        c = ((SM >= t) & (SM < DUP_SIM)).sum(1)
        out["math500"][str(t)] = {"same_subject_precision": float(same[sel].mean()) if sel.any() else None,
                                  "cov_ge1": float(np.mean(c >= 1)), "cov_ge4": float(np.mean(c >= 4))}
    # arithmetic: commuted sums (same gold) and the rest
    pairs = [(a, b) for a in range(10) for b in range(10)]
    A = cached_embeddings("arithmetic-1digit-sums", [f"What is {a} + {b}?" for a, b in pairs], embedder)
    SA = A @ A.T
    comm = [SA[pairs.index((a, b)), pairs.index((b, a))] for a, b in pairs if a != b]
    others = [SA[x, y] for x in range(100) for y in range(100)
              if x != y and pairs[x] != pairs[y][::-1]]
    out["arithmetic"] = {"commuted_pair_min": float(np.min(comm)), "commuted_pair_median": float(np.median(comm)),
                         "other_pairs_pct": {str(p): float(np.percentile(others, p)) for p in (1, 50, 99)},
                         "share_of_other_pairs_ge_0.6": float(np.mean(np.asarray(others) >= 0.6)),
                         "share_of_other_pairs_ge_0.9": float(np.mean(np.asarray(others) >= 0.9))}
    return out


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--skip-calibration", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "pool.json"))
    args = ap.parse_args()
    rows = load_gsm8k("train")
    embedder = load_embedder("all-minilm-l6-v2")
    vectors = cached_embeddings("gsm8k-train-questions", [r["question"] for r in rows], embedder)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").is_file() else "unknown"
    result: dict = {"machine": f"{os.cpu_count()} cores, {cpu}", "load_avg_start": os.getloadavg(),
                    "lancedb": __import__("lancedb").__version__, "B": B, "G": G}
    workdir = Path(tempfile.mkdtemp(prefix="lanpo-bench-pool-"))
    try:
        print("ingest ...", flush=True)
        result["ingest"] = bench_ingest(rows, vectors, embedder, workdir)
        result["sizes"] = {}
        for size in [int(s) for s in args.sizes.split(",")]:
            result["sizes"][str(size)] = bench_size(rows, vectors, size, args.queries, workdir)
        if not args.skip_calibration:
            print("calibration ...", flush=True)
            result["calibration"] = calibrate(rows, vectors, embedder)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    ing = result["ingest"]
    print(f"\ningest (B={B} x G={G} rows per step): {ing['rows_per_s_embedding_excluded']:.0f} rows/s embedding "
          f"excluded, {ing['rows_per_s_embedding_included']:.0f} rows/s included "
          f"(embedder {ing['embed_texts_per_s']:.0f} texts/s)")
    print(f"{'rows':>7} | {'bulk rows/s':>11} | {'MB/1k rows':>10} | {'index load s':>12} | "
          f"{'memory p50/p95 ms':>17} | {'attempts p50':>12}")
    for size, r in result["sizes"].items():
        m = r["memory"]
        print(f"{size:>7} | {r['bulk_rows_per_s']:>11.0f} | {r['disk_bytes_per_1k_rows'] / 1e6:>10.2f} | "
              f"{r['memory_index_load_s']:>12.2f} | {m['p50_ms']:>7.2f} / {m['p95_ms']:>7.2f} | "
              f"{r['earlier_attempts_8_problems']['p50_ms']:>9.1f} ms")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
