"""Length generalisation: trained on lengths 1..12, is the model right on 13..16, with the head formed?

The runs are ordinary seed-sweep runs whose recipe trains the main task on 1..12 (``--max-train-len 12``); this
script only renders their rows (``benchmarks/seed_sweep.py`` records every length's accuracy and attn1 peakiness).
The goal: accuracy >= 0.9 on every length 13..16 (teacher-forced, full test split) with the iteration head formed
(attn1 peakiness >= 0.9 on the trained lengths 4..12, and the detector ranks a layer-2 head first and flags it).

    python benchmarks/seed_sweep.py --tasks parity,binary_copy --seeds 0-5 --runs-dir runs/length_generalisation \\
        --jsonl benchmarks/results/length_generalisation.jsonl \\
        --recipe 'cumsum16:parity,binary_copy=--max-train-len 12 --curriculum binary_copy:0.5:3000,cumsum:0.3:0:16'
    python benchmarks/length_generalisation.py      # benchmarks/results/length_generalisation.md

Why a helper helps at all: the main task never sees a length over 12, but the look-up the iteration head does
(from the position that predicts s_t back to x_t) is the same for every task, so a helper task trained on 1..16
(the curriculum's fourth field, TASK:SHARE:STEPS:MAX_LEN) can train it at the distances 13..16 need.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_sweep import FORMED, ROOT, _f, load_records  # noqa: E402  (a sibling benchmark script)

TRAINED = range(4, 13)  # the evaluated lengths the main task trains on (L = 1..3 have few distinct rows)
UNSEEN = range(13, 17)
GOAL = 0.9


def judge(r: dict) -> dict:
    """The row's numbers against the goal; an empty dict where the run has no result for some length 13..16."""
    per = r.get("per_length") or {}
    acc = {L: per[str(L)]["accuracy"] for L in (*TRAINED, *UNSEEN) if str(L) in per}
    if not all(L in acc for L in UNSEEN):
        return {}
    attn1 = [per[str(L)]["attn1"] for L in TRAINED if str(L) in per and per[str(L)]["attn1"] is not None]
    head = (bool(attn1) and sum(attn1) / len(attn1) >= FORMED
            and bool((r.get("detection") or {}).get("paper_head", False)))
    unseen = [acc[L] for L in UNSEEN]
    trained = [acc[L] for L in TRAINED if L in acc]
    return {"trained": sum(trained) / len(trained), "unseen": unseen, "mean_unseen": sum(unseen) / len(unseen),
            "attn1_trained": sum(attn1) / len(attn1) if attn1 else None,
            "attn1_unseen": [per[str(L)]["attn1"] for L in UNSEEN], "head": head,
            "goal": head and min(unseen) >= GOAL}


def render(records: list[dict], notes: Path | None) -> str:
    rows = sorted((r for r in records if r.get("status") == "ok"), key=lambda r: (r["recipe"], r["task"], r["seed"]))
    lines = ["# Length generalisation", "",
             "Rendered by `python benchmarks/length_generalisation.py` from `length_generalisation.jsonl` (runs by "
             "`benchmarks/seed_sweep.py`; each row's flags are its recipe's). Trained on lengths 1..12 "
             "(`--max-train-len 12`), tested on the full test split of every length. Goal: accuracy >= 0.9 on every "
             f"length 13..16 with the head formed (attn1 peakiness >= {FORMED} on L = 4..12 and the detector's "
             "top head in layer 2, flagged).", "",
             "| recipe | task | seed | acc 4..12 | acc 13 | 14 | 15 | 16 | attn1 4..12 | attn1 13..16 | head | goal | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary: dict[tuple[str, str], list[bool]] = {}
    flags: dict[tuple[str, str], str] = {}
    for r in rows:
        j = judge(r)
        if not j:
            continue
        summary.setdefault((r["recipe"], r["task"]), []).append(j["goal"])
        flags[(r["recipe"], r["task"])] = r.get("flags", "")
        lines.append("| " + " | ".join([
            r["recipe"], r["task"], str(r["seed"]), _f(j["trained"]), *(_f(a) for a in j["unseen"]),
            _f(j["attn1_trained"]), " / ".join(_f(a, 2) for a in j["attn1_unseen"]), "yes" if j["head"] else "no",
            "**yes**" if j["goal"] else "no", _f(r.get("wall_s"), 0)]) + " |")
    lines += ["", "## Per recipe", "", "| recipe | task | goal met | flags |", "|---|---|---|---|"]
    for (recipe, task), goals in summary.items():
        lines.append(f"| {recipe} | {task} | {sum(goals)} of {len(goals)} | `{flags[(recipe, task)]}` |")
    if notes is not None and notes.is_file():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    results = ROOT / "benchmarks/results"
    p.add_argument("--jsonl", type=Path, default=results / "length_generalisation.jsonl")
    p.add_argument("--out", type=Path, default=results / "length_generalisation.md")
    p.add_argument("--notes", type=Path, default=None, help="a markdown file appended to the table (default: none)")
    args = p.parse_args(argv)
    if not args.jsonl.is_file():
        sys.exit(f"error: no rows at {args.jsonl}; run benchmarks/seed_sweep.py with --jsonl {args.jsonl} first")
    args.out.write_text(render(load_records(args.jsonl), args.notes))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
