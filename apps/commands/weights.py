"""``rfi weights list`` / ``rfi weights fetch NAME``: the model zoo (:mod:`encoders.weights.zoo`) on the command line.

Example:
    rfi weights list                      # name, source, hash check, status, destination
    rfi weights fetch imagenet_l2_3_0     # -> ~/.cache/torch/hub/checkpoints/imagenet_l2_3_0.pt
    rfi weights fetch torchvision_alexnet --dest weights/
"""

from __future__ import annotations

import argparse
import json

from encoders.weights import zoo


def register_weights(parser: argparse.ArgumentParser) -> None:
    """Add ``list`` and ``fetch`` to the ``weights`` command's parser."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser(
        "list",
        help="the checkpoints the zoo knows, with URL, hash check and local status",
        description="List the zoo's checkpoints (nothing is downloaded).",
    )
    ls.add_argument("--dest", help="folder to look in (default: torch hub cache, torch.hub.get_dir()/checkpoints)")
    ls.add_argument("--json", action="store_true", help="print JSON (one object per entry) instead of a table")
    fetch = sub.add_parser(
        "fetch",
        help="download checkpoints (atomic, hash-checked) into the torch hub cache",
        description="Download zoo checkpoints: a temporary file is renamed into place only "
        "after its SHA-256 is checked (published hash) or recorded (first fetch).",
    )
    fetch.add_argument("names", nargs="+", metavar="NAME", help="zoo names (see `rfi weights list`)")
    fetch.add_argument("--dest", help="destination folder (default: torch hub cache)")
    fetch.add_argument("--force", action="store_true", help="download again even if a verified copy is present")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        rows = [zoo.as_dict(e, args.dest) for e in zoo.entries()]
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        print(f"{'name':<22} {'arch':<9} {'dataset':<9} {'sha256':<18} {'status':<23} description")
        for r in rows:
            check = f"prefix {r['sha256']}" if r["sha256"] else "recorded on fetch"
            print(f"{r['name']:<22} {r['arch']:<9} {r['dataset']:<9} {check:<18} {r['status']:<23} {r['description']}")
        print(
            f"\nfiles go to {zoo.destination(zoo.entries()[0], args.dest).parent} "
            f"(fetch: rfi weights fetch NAME; URLs: rfi weights list --json)"
        )
        return 0
    for name in args.names:  # unknown names fail before anything downloads
        zoo.get_entry(name)
    for name in args.names:
        path = zoo.fetch(name, args.dest, force=args.force, show_progress=not args.quiet)
        print(path)
    return 0
