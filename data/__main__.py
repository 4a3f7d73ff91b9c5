"""`python -m data synthetic ...`: write the seeded synthetic datasets the repository ships and
its tests and benchmarks use, exactly as they were written.

    python -m data synthetic --n 400 --seed 0 --out data/examples/tool-calling.jsonl
    python -m data synthetic --n 2000 --long-tail --out long-tail.jsonl

Preparing a recipe's data is `keel prepare RECIPE` (it reads the recipe, which the data package
does not).
"""

from __future__ import annotations

import sys

from data.errors import KeelError
from data.options import ArgumentParser, check_count


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="synthetic")
    s = sub.add_parser("synthetic", help="write seeded synthetic tool-calling conversations as JSON Lines")
    s.add_argument("--n", type=int, default=400, help="number of conversations")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--long-tail", action="store_true",
                   help="user turns carry pasted context of log-normal length, as real chat data does")
    s.add_argument("--out", required=True, help="the JSON Lines file to write (replaced whole, never half-written)")
    a = p.parse_args(argv)

    from data.synthetic import generate_conversations, write_jsonl

    try:
        check_count(a.n, "--n")
        write_jsonl(generate_conversations(a.n, seed=a.seed, long_tail=a.long_tail), a.out)
    except KeelError as exc:
        print(f"keel: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"keel: error: --out {a.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{a.n} conversations -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
