"""Test configuration shared by the test modules."""

import pytest


# XLA compiles slowly on these CPUs and every xdist worker compiles for itself. Under plain `-n N` the
# scheduling becomes loadgroup: tests without an `xdist_group` mark are still balanced one by one, while a
# module marked with a group (test_flows.py: its tests share shapes, eager-op and jit caches) runs on one worker
# and compiles once. xdist workers re-parse the command line, so the controller tells them via workerinput.
def pytest_configure(config):
  workerinput = getattr(config, "workerinput", None)
  open("/tmp/iaftests_dbg.txt", "a").write(f"{workerinput!r} {config.option.dist}\n")
  if workerinput is None:
    if getattr(config.option, "dist", "no") == "load":
      config.option.dist = "loadgroup"
  elif workerinput.get("loadgroup_from_conftest"):
    config.option.loadgroup = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  node.workerinput["loadgroup_from_conftest"] = node.config.getoption("dist") == "loadgroup"


def pytest_collection_modifyitems(config, items):
  open("/tmp/iaftests_dbg.txt", "a").write(f"LG {config.getvalue('loadgroup') if hasattr(config.option, 'loadgroup') else None} {[i.nodeid for i in items][:2]}\n")
