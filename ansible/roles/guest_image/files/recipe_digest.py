"""Print a digest of what an extpv guest image is built from (recipe, agent, eBPF, arguments).

python3 recipe_digest.py REPO [ARG...]
"""

import hashlib
import sys
from pathlib import Path

SKIP = {"__pycache__", "out", ".mypy_cache"}


def main() -> None:
    repo = Path(sys.argv[1])
    h = hashlib.sha256("\0".join(sys.argv[2:]).encode())
    roots = ["images", "pvagent", "pvproto", "bpf", "bench", "pyproject.toml"]
    for root in roots:
        base = repo / root
        paths = [base] if base.is_file() else sorted(base.rglob("*")) if base.is_dir() else []
        for path in paths:
            if path.is_file() and not SKIP.intersection(path.relative_to(repo).parts):
                if path.suffix in {".o", ".pyc"} or path.name in {"spscq", "spscq-static"}:
                    continue  # build outputs, rebuilt from the sources hashed here
                h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    print(h.hexdigest())


if __name__ == "__main__":
    main()
