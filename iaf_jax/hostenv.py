"""The host process's environment, set before JAX starts (this module imports no JAX, so the entry points can
call it first thing)."""
from __future__ import annotations

import os
import sys
from typing import Optional

HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def hugepages_env(environ=None) -> Optional[dict]:
  """The environment with glibc's malloc set to use transparent huge pages, or None if it already is, is
  switched off (IAF_JAX_HUGEPAGES=0), or cannot be (not Linux/glibc, THP 'never').

  XLA:CPU allocates every executable's temporary buffers afresh per call (hundreds of MB for IAF 8/1920), and
  glibc returns such large blocks to the kernel when freed: each step then takes one page fault per 4 KiB
  (~54,000 a step, ~25% of the step's CPU time). With huge pages it is one per 2 MiB.
  """
  import platform
  environ = dict(os.environ if environ is None else environ)
  if environ.get("IAF_JAX_HUGEPAGES", "1") == "0" or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return None
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return None
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      if "[never]" in f.read():
        return None
  except OSError:
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGEPAGES_TUNABLE}" if tunables else HUGEPAGES_TUNABLE
  return environ


def reexec_with_hugepages() -> None:
  """Restart this process (same interpreter, same command line) with hugepages_env(), if it differs: glibc reads
  its tunables only at process start. Call first thing in a command-line entry point, never in a library."""
  env = hugepages_env()
  if env is not None and getattr(sys, "orig_argv", None):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
