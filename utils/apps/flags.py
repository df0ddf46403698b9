"""An argparse parser that takes every long flag in both spellings: `--max_length` and
`--max-length` alike (the original used underscores, servers often use dashes). Light: no
torch import, so client scripts can use it."""
from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        import sys
        args = list(sys.argv[1:] if args is None else args)
        known = self._option_string_actions
        out = []
        for i, a in enumerate(args):
            if a == "--":                               # everything after it is positional
                out += args[i:]
                break
            if a.startswith("--") and len(a) > 2:
                name, eq, value = a.partition("=")
                if name not in known:
                    for alt in (name[:2] + name[2:].replace("-", "_"), name[:2] + name[2:].replace("_", "-")):
                        if alt in known:
                            name = alt
                            break
                a = name + eq + value
            out.append(a)
        return super().parse_known_args(out, namespace)
