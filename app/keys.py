"""python -m app.keys [--id ID] [--scopes generate,edit]: make a new API key.

Prints the key (give it to the client) and the entry for MEMOIR_API_KEYS / MEMOIR_API_KEYS_FILE,
which holds only the key's SHA-256.
"""

from __future__ import annotations

import argparse

from .security import SCOPES, config_line, new_key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("--id", default="client", help="key id, recorded in the audit log")
    parser.add_argument("--scopes", default="generate", help=f"comma-separated: {', '.join(SCOPES)}")
    args = parser.parse_args(argv)
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    unknown = set(scopes) - set(SCOPES)
    if unknown or not scopes:
        parser.error(f"unknown scopes {sorted(unknown)}; choose from {', '.join(SCOPES)}")
    key = new_key()
    print(f"key:   {key}")
    print(f"entry: {config_line(args.id, scopes, key)}")


if __name__ == "__main__":
    main()
