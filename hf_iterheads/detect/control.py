"""The positive control of the text path: the bundled text organism, probed the way a scan probes its LLMs.

``text-organism`` is a small GPT-2 trained (``hf_iterheads.training.text_data``) on the detector's own text
probes, through the real GPT-2 tokenizer, so it has an iteration head that the text path must find. A scan that
probes some model through text (a Hub LLM, ``--template``, ``--shots``, ``--chat``) runs the organism under the same
templates and shots (``--control``; on by default then), one verdict per template:

* ``found``: the top head is detected, has an iteration score >= ``FOUND_SCORE``, zero-ablating it removes at
  least ``FOUND_REMOVED`` of the accuracy above chance, and patching moves at least ``FOUND_PATCH`` of the logit
  difference (when the model separates the answers);
* ``drop``: the iteration score's fall from the organism's score under its default training rendering (the
  default template, no shots), so a rendering it was not trained on says how much it costs.

A template under which the organism's head is not found is a rendering whose LLM results cannot be trusted:
``summary.md`` and ``report.html`` flag it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import IterHeadsError
from ..outputs import write_json_atomic
from .prompts import DEFAULT_TEMPLATE

ORGANISM = "text-organism"
CONTROL_FILE = "control.json"
FOUND_SCORE, FOUND_REMOVED, FOUND_PATCH = 0.9, 0.5, 0.5
RULE = (f"found = top head detected, iteration score >= {FOUND_SCORE}, zero-ablation removes >= {FOUND_REMOVED:.0%} of the "
        f"accuracy above chance, patching share >= {FOUND_PATCH} (when the model separates the answers)")


def organism_path(name: str = ORGANISM) -> Path | None:
    from ..bundled import bundled_path

    return bundled_path(name)


def organism_meta(path: str | Path) -> dict:
    """The training recipe a text organism carries in its config (``iterheads``: task, templates, shots...)."""
    config = json.loads((Path(path) / "config.json").read_text())
    meta = config.get("iterheads") or {}
    if not meta.get("text_organism"):
        raise IterHeadsError(f"{path} is not a text organism (its config has no iterheads.text_organism)")
    return meta


def control_wanted(parts: list[dict[str, Any]], options: dict[str, Any], flag: bool | None) -> bool:
    """``--control`` / ``--no-control`` when given, else: did the scan probe some model through text?"""
    if flag is not None:
        return bool(flag)
    if options.get("rendering") == "text" or options.get("template") or int(options.get("shots") or 0) or options.get("chat"):
        return True
    return any((p.get("result") or {}).get("rendering") == "text" for p in parts)


def control_settings(n: int, lengths: str, options: dict[str, Any]) -> dict[str, Any]:
    from .probes import parse_lengths

    templates = options.get("template") or [DEFAULT_TEMPLATE]
    return {"n": int(n), "lengths": parse_lengths(lengths), "templates": list(templates), "shots": int(options.get("shots") or 0),
            "chat": bool(options.get("chat")), "seed": int(options.get("seed") or 0)}


def _verdict(d: dict) -> dict[str, Any]:
    best = d["top_heads"][0]
    row: dict[str, Any] = {"layer": best["layer"], "head": best["head"], "score": best["score"], "detected": bool(best["detected"])}
    ab = d.get("ablation") or {}
    clean = (ab.get("clean") or {}).get("token_accuracy")
    chance = (ab.get("clean") or {}).get("chance_token_accuracy")
    removed = None
    if clean is not None and clean > chance:
        removed = (clean - ab["zero"]["top"]["token_accuracy"]) / (clean - chance)
    patch = d.get("patch") or {}
    share = (patch.get("heads") or [{}])[0].get("share") if not patch.get("refused") else None
    row.update(clean_accuracy=clean, chance=chance, removed=removed, patch_share=share, separates=patch.get("separates"))
    ok = row["detected"] and row["score"] >= FOUND_SCORE and removed is not None and removed >= FOUND_REMOVED
    row["found"] = bool(ok and (share is None and not patch.get("separates", True) or share is not None and share >= FOUND_PATCH))
    if share is None and patch.get("separates") is False:
        row["found"] = False  # the organism must separate its own answers: it was trained to
    return row


def run_control(n: int, lengths: str, options: dict[str, Any], name: str = ORGANISM) -> dict[str, Any]:
    """The organism under every template of the scan (same shots, chat, seed): one verdict per template."""
    from .detection import IterationHeadDetector

    path = organism_path(name) or (Path(name) if Path(name).is_dir() else None)
    if path is None:
        raise IterHeadsError(f"the text organism {name!r} is not bundled with this install")
    meta = organism_meta(path)
    settings = control_settings(n, lengths, options)
    detector = IterationHeadDetector(str(path))
    kw = {"shots": settings["shots"], "chat": settings["chat"], "seed": settings["seed"], "rendering": "text",
          "ablate": True, "patch": True, "batch_size": int(options.get("batch_size") or 16)}

    def one(template: str, shots: int | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {"template": template, "trained": template in meta.get("templates", [])}
        args = {**kw, "shots": kw["shots"] if shots is None else shots}
        try:
            entry.update(_verdict(detector.detect(meta["task"], lengths, n, template=template, **args).to_dict()))
        except IterHeadsError as err:
            entry.update(found=False, error=str(err))
        return entry

    rows = [one(t) for t in settings["templates"]]
    reference = next((r for r in rows if r["template"] == DEFAULT_TEMPLATE), None) if not settings["shots"] else None
    if reference is None or "score" not in reference:
        reference = one(DEFAULT_TEMPLATE, shots=0)
    ref = reference.get("score")
    for r in rows:
        r["drop"] = None if ref is None or r.get("score") is None else round(ref - r["score"], 6)
    return {"organism": name, "task": meta["task"], "trained_templates": meta.get("templates", []),
            "trained_shots": sorted(set(meta.get("shots", []))), "settings": settings, "reference_score": ref, "rule": RULE,
            "templates": rows}


def ensure_control(out: Path, n: int, lengths: str, options: dict[str, Any]) -> dict[str, Any]:
    """``DIR/control.json`` for these settings: kept when a resumed scan has the same, rerun otherwise."""
    path = Path(out) / CONTROL_FILE
    wanted = control_settings(n, lengths, options)
    if path.is_file():
        try:
            had = json.loads(path.read_text())
            if had.get("settings") == wanted:
                return had
        except (OSError, json.JSONDecodeError):
            pass
    try:
        control = run_control(n, lengths, options)
    except IterHeadsError as err:
        control = {"organism": ORGANISM, "settings": wanted, "error": str(err), "templates": [], "rule": RULE}
    write_json_atomic(control, path)
    return control


def load_control(out: Path) -> dict[str, Any] | None:
    path = Path(out) / CONTROL_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def flags(control: dict[str, Any] | None) -> list[str]:
    """One warning per template under which the organism's head is not found (or the control could not run)."""
    if not control:
        return []
    if control.get("error"):
        return [f"control not run: {control['error']}"]
    shots = control["settings"].get("shots", 0)
    out = []
    for r in control["templates"]:
        if not r.get("found"):
            why = r.get("error") or (f"iteration score {r['score']:.3f}" + (f", {r['drop']:.3f} below its default template"
                                                                            if r.get("drop") is not None else ""))
            out.append(f"control: the text organism's head is NOT found under template {r['template']!r} "
                       f"(shots {shots}; {why}): results under this rendering cannot be trusted")
    return out


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def control_markdown(control: dict[str, Any] | None) -> list[str]:
    """The control's section of summary.md (empty when the scan ran none)."""
    if not control:
        return []
    lines = ["", "## Control: the text organism", ""]
    if control.get("error"):
        return lines + [f"**FLAG** control not run: {control['error']}"]
    s = control["settings"]
    lines += [f"`{control['organism']}` ({control['task']}, trained on {len(control['trained_templates'])} templates with shots "
              f"{control['trained_shots']}) under this scan's renderings (shots {s['shots']}{', chat' if s['chat'] else ''}); "
              f"{control['rule']}. Drop: its iteration score under its default template without shots "
              f"({_f(control.get('reference_score'))}) minus the score under this template.", "",
              "| template | trained on | head | score | drop | removed by ablation | patching share | found |",
              "|---|---|---|---|---|---|---|---|"]
    for r in control["templates"]:
        t = r["template"].replace("\n", "\\n").replace("|", "\\|")
        head = f"L{r['layer']}H{r['head']}" if "layer" in r else "-"
        lines.append(f"| `{t}` | {'yes' if r.get('trained') else 'no'} | {head} | {_f(r.get('score'))} | {_f(r.get('drop'))} | "
                     f"{_f(r.get('removed'))} | {_f(r.get('patch_share'))} | {'yes' if r.get('found') else '**NO**'} |")
    flagged = flags(control)
    lines += [""] + [f"**FLAG** {f}" for f in flagged] if flagged else ["", "The organism's head is found under every template."]
    return lines


def control_html(control: dict[str, Any] | None) -> str:
    """The control's block of report.html."""
    import html

    if not control:
        return ""
    esc = lambda v: html.escape(str(v))  # noqa: E731
    out = ['<section id="control"><h2>Control: the text organism</h2>']
    out += [f'<p class="flag">{esc(f)}</p>' for f in flags(control)]
    if control.get("error"):
        return "".join(out) + "</section>"
    s = control["settings"]
    out.append(f"<p>{esc(control['organism'])} ({esc(control['task'])}) under this scan's templates, shots {s['shots']}"
               f"{', chat' if s['chat'] else ''}; {esc(control['rule'])}. Drop: from its score under its default template "
               f"without shots ({_f(control.get('reference_score'))}).</p>")
    head = '<th class="l">template</th>' + "".join(f"<th>{h}</th>" for h in ("trained on", "head", "score", "drop", "removed",
                                                                           "patching", "found"))
    rows = []
    for r in control["templates"]:
        where = f"L{r['layer']}H{r['head']}" if "layer" in r else "-"
        found = '<span class="yes">yes</span>' if r.get("found") else '<span class="fail">NO</span>'
        rows.append(f'<tr><td class="l"><code>{esc(r["template"])}</code></td><td>{"yes" if r.get("trained") else "no"}</td>'
                    f'<td>{where}</td><td>{_f(r.get("score"))}</td>'
                    f'<td>{_f(r.get("drop"))}</td><td>{_f(r.get("removed"))}</td><td>{_f(r.get("patch_share"))}</td><td>{found}</td></tr>')
    out.append(f"<table><tr>{head}</tr>{''.join(rows)}</table></section>")
    return "".join(out)


# the renderings the organism's card and test measure: its trained templates, one it never saw, and few-shot
CARD_RENDERINGS: tuple[tuple[str, str, int], ...] = (
    ("default template", DEFAULT_TEMPLATE, 0),
    ("'=' template", "{inputs} = {states}", 0),
    ("input/output template", "Input: {inputs}\nOutput: {states}", 0),
    ("held-out template", "{inputs} => {states} ;", 0),
    ("default template, 2 shots", DEFAULT_TEMPLATE, 2),
    ("default template, 4 shots", DEFAULT_TEMPLATE, 4),
)


def measure_organism(path: str | Path, lengths: str = "4-16", n: int = 32, seed: int = 0,
                     renderings: tuple[tuple[str, str, int], ...] = CARD_RENDERINGS, batch_size: int = 16) -> dict[str, Any]:
    """The organism's verdict (score, ablation, patching, found) under each rendering, and the drop from its
    score under the default template without shots."""
    from .detection import IterationHeadDetector

    meta = organism_meta(path)
    detector = IterationHeadDetector(str(path))
    rows = []
    for name, template, shots in renderings:
        d = detector.detect(meta["task"], lengths, n, template=template, shots=shots, seed=seed, rendering="text", ablate=True,
                            patch=True, batch_size=batch_size).to_dict()
        rows.append({"rendering": name, "template": template, "shots": shots, "trained": template in meta.get("templates", []),
                     **_verdict(d), "eoi_layer": d["eoi_top_heads"][0]["layer"], "eoi_score": d["eoi_top_heads"][0]["score"],
                     "circuit": (d.get("circuit") or {}).get("text")})
    for r in rows:
        ref = next((x["score"] for x in rows if x["template"] == DEFAULT_TEMPLATE and x["shots"] == 0), None)
        r["drop"] = None if ref is None else round(ref - r["score"], 6)
    return {"task": meta["task"], "lengths": lengths, "n": n, "seed": seed, "rule": RULE, "renderings": rows}


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_iterheads.detect.control [ORGANISM] --out FILE``: the card's measurements as JSON."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m hf_iterheads.detect.control", description="measure the text organism")
    p.add_argument("organism", nargs="?", default=ORGANISM)
    p.add_argument("--lengths", default="4-16")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        path = organism_path(a.organism) or Path(a.organism)
        result = measure_organism(path, a.lengths, a.n)
    except IterHeadsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json_atomic(result, Path(a.out))
    for r in result["renderings"]:
        print(f"{r['rendering']}: L{r['layer']}H{r['head']} score {r['score']:.3f} removed {r['removed']} "
              f"patch {r['patch_share']} found {r['found']} drop {r['drop']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
