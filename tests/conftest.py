import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Many tests compile the same tiny models: share compiled executables across tests and pytest workers
# (also inherited by the CLI subprocesses the end-to-end tests start).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "iaf_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# evaluate.py splits a CPU host into one XLA device per core (hostenv.cpu_devices_env); the tests that run it
# choose their device count themselves (XLA_FLAGS or IAF_JAX_CPU_DEVICES), whatever the machine's cores.
os.environ.setdefault("IAF_JAX_CPU_DEVICES", "1")
