"""The `specserve` entry point run in the test process.

A subprocess costs seconds of imports (and, for cluster commands, of joining the cluster);
tests that run a command as a user does keep doing so, the rest call this.
"""

from __future__ import annotations

import contextlib
import io

import torch

from specserve.cluster import cli


def main_here(*argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `specserve ARGV`; torch's thread count, which some
    commands set, is put back for the tests that follow."""
    threads, out, err = torch.get_num_threads(), io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(list(argv))
    finally:
        torch.set_num_threads(threads)
    return status, out.getvalue(), err.getvalue()
