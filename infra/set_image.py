"""Rename the project image everywhere it is written: infra/IMAGE (the one the tests read), every
file under infra/ and docs/, in one go and on any OS (no GNU sed needed).

    python infra/set_image.py 123456789012.dkr.ecr.us-west-2.amazonaws.com/ml/upsr-ray:0.1.0-ray2.60.0-py311-gpu

The tag should keep its ``-ray<Ray version>-py311-gpu`` ending: tests/test_infra.py checks it
against the pinned Ray.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_FILE = REPO / "infra" / "IMAGE"


def current_image() -> str:
    return IMAGE_FILE.read_text().strip()


def files_naming(image: str) -> list[Path]:
    candidates = [*(REPO / "infra").rglob("*"), *(REPO / "docs").glob("*.md"), REPO / "README.md"]
    return sorted(path for path in candidates if path.is_file() and path.suffix in (".yaml", ".md", "")
                  and path != IMAGE_FILE and image in path.read_text(errors="ignore"))


def main(argv: list[str]) -> int:
    if len(argv) != 1 or ":" not in argv[0].rsplit("/", 1)[-1]:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    old, new = current_image(), argv[0]
    changed = files_naming(old)
    for path in changed:
        path.write_text(path.read_text().replace(old, new))
    IMAGE_FILE.write_text(new + "\n")
    print(f"{old} -> {new} in infra/IMAGE and {len(changed)} files: "
          + ", ".join(str(p.relative_to(REPO)) for p in changed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
