"""The host process's environment, set before JAX starts (this module imports no JAX, so the entry points can
call it first thing)."""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional

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


TCMALLOC = "libtcmalloc_minimal.so.4"   # gperftools' tcmalloc (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_tcmalloc() -> Optional[str]:
  """The path of an installed tcmalloc, or None."""
  for d in _LIB_DIRS:
    path = os.path.join(d, TCMALLOC)
    if os.path.isfile(path):
      return path
  return None


def allocator_env(environ=None, find: Callable[[], Optional[str]] = find_tcmalloc) -> Optional[dict]:
  """The environment with tcmalloc preloaded, or None where nothing changes. IAF_JAX_MALLOC: 'auto' (the
  default: tcmalloc where installed), 'tcmalloc' (an error where it is not) or 'glibc' (never).

  XLA:CPU allocates each executable's temporaries afresh at every call. glibc's malloc (even on huge pages,
  hugepages_env) hands the large ones back to the kernel and maps them again, and its step time moves by up
  to 1.25x between processes; tcmalloc keeps them mapped. Quiet A/B, bench at batch 64, three alternating
  pairs (docs/performance.md, thirteenth round): median 1.05x / 1.25x / 1.04x the training img/s for diag /
  IAF 2/320 / IAF 8/1920, never more than 1.2% slower."""
  environ = dict(os.environ if environ is None else environ)
  mode = environ.get("IAF_JAX_MALLOC", "auto").strip()
  if mode not in ("auto", "tcmalloc", "glibc"):
    raise SystemExit(f"error: IAF_JAX_MALLOC={mode!r}: must be auto, tcmalloc or glibc")
  preload = environ.get("LD_PRELOAD", "")
  if mode == "glibc" or "tcmalloc" in preload or not sys.platform.startswith("linux"):
    return None
  path = find()
  if path is None:
    if mode == "tcmalloc":
      raise SystemExit(f"error: IAF_JAX_MALLOC=tcmalloc, but no {TCMALLOC} in {', '.join(_LIB_DIRS)} "
                       "(apt-get install libtcmalloc-minimal4)")
    return None
  environ["LD_PRELOAD"] = f"{path}:{preload}" if preload else path
  # tcmalloc reports every allocation above 1 GiB on stderr; the 20-rung models' buffers are that large.
  environ.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
  return environ


def malloc_in_use() -> str:
  """'tcmalloc' when it is loaded into this process, else 'glibc' (Linux; 'unknown' elsewhere)."""
  try:
    with open("/proc/self/maps") as f:
      return "tcmalloc" if "libtcmalloc" in f.read() else "glibc"
  except OSError:
    return "unknown"


CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def with_cpu_device_count(flags: str, n: int) -> str:
  """XLA_FLAGS `flags` with N forced CPU devices, the count first: XLA stops reading XLA_FLAGS at a word that is
  not a flag (such as the common 'intra_op_parallelism_threads=1') and would drop a count after it."""
  return f"{CPU_DEVICES_FLAG}={n} {flags}".strip()


def usable_cores() -> int:
  """Cores this process may run on (its affinity: `taskset -c 0` gives 1)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def cpu_devices_env(environ=None) -> Optional[dict]:
  """The environment with XLA:CPU split into one device per usable core, or None where there is nothing to
  change: XLA_FLAGS already sets a device count, IAF_JAX_CPU_DEVICES=1, or one usable core.

  For the evaluator. One XLA:CPU device leaves part of the cores idle in importance sampling's many small ops;
  with one device per core each device samples its own examples (sharding.shard_examples). On 2 cores this
  took the 4-rung CIFAR-10 ResNet VAE's K=128 evaluation of 1,000 images from 275.5 to 149.2 s (AMD EPYC, AVX2;
  docs/cifar10.md). On a GPU/TPU host the flag splits only the CPU backend, which is then unused.
  IAF_JAX_CPU_DEVICES=N asks for N devices, 'auto' (the default) for one per usable core.
  """
  environ = dict(os.environ if environ is None else environ)
  flags = environ.get("XLA_FLAGS", "")
  if CPU_DEVICES_FLAG in flags:
    return None
  raw = environ.get("IAF_JAX_CPU_DEVICES", "auto").strip()
  if raw == "auto":
    n = usable_cores()
  elif raw.isdigit() and int(raw) >= 1:
    n = int(raw)
  else:
    raise SystemExit(f"error: IAF_JAX_CPU_DEVICES={raw!r}: must be 'auto' or an integer >= 1")
  if n <= 1:
    return None
  environ["XLA_FLAGS"] = with_cpu_device_count(flags, n)
  return environ


def host_env(environ=None, cpu_devices: bool = False) -> Optional[dict]:
  """allocator_env() and hugepages_env(), and with cpu_devices also cpu_devices_env(); None if none changes
  anything. (With tcmalloc preloaded glibc's tunable is unused, and kept for IAF_JAX_MALLOC=glibc's sake.)"""
  env = allocator_env(environ)
  env = hugepages_env(env if env is not None else environ) or env
  if cpu_devices:
    env = cpu_devices_env(env if env is not None else environ) or env
  return env


def reexec_with_host_env(cpu_devices: bool = False) -> None:
  """Restart this process (same interpreter, same command line) with host_env(), if that differs: the loader
  reads LD_PRELOAD, glibc its tunables and XLA its flags only at process start. Call first thing in a
  command-line entry point, never in a library."""
  env = host_env(cpu_devices=cpu_devices)
  if env is not None and getattr(sys, "orig_argv", None):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
