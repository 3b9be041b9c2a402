"""Rebuild the model cards of the bundled checkpoints from their sources in this folder.

    python model_cards/build_cards.py            # rewrite hf_iterheads/checkpoints/NAME/README.md
    python model_cards/build_cards.py --check    # exit 1 when a card is out of date

A card is the training run's card (model-index with the measured test results, written by
``hf-iterheads train`` from ``hf_iterheads/templates/model_card_template.md``) followed by ``NAME.md`` here (mechanism found,
intended use, limitations), rendered with the detector's and the ablation's numbers measured on the
checkpoint at build time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_iterheads.modeling import bundled_path
from hf_iterheads.paper.release import release_card

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report cards that differ from their sources")
    args = parser.parse_args()
    stale = []
    for notes in sorted(HERE.glob("*.md")):
        path = bundled_path(notes.stem)
        if path is None:
            print(f"{notes.name}: no bundled checkpoint named {notes.stem}", file=sys.stderr)
            return 2
        card = release_card(path, notes)
        if (path / "README.md").read_text() != card:
            stale.append(notes.stem)
            if not args.check:
                (path / "README.md").write_text(card)
        print(f"{notes.stem}: {'out of date' if args.check and notes.stem in stale else 'ok'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
