"""Registration of `drm` in mergekit's registry, explicit and through the hook.

The subprocess tests run the interpreter this suite runs under, so they need
the package *installed* in it (`pip install -e .` or `pip install .`): the
hook's `mergekit_drm.pth` lives in site-packages, not in the source tree. They run from a temporary directory so that the
checkout on the current directory cannot stand in for the installed package.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

TARGET = "mergekit.merge_methods"
NOT_INSTALLED = (
    "the .pth hook is not installed in this interpreter's site-packages; "
    "install the package (`pip install -e '.[test]'`) before running the tests"
)


def run_python(args, cwd, check=True):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def run_code(code, cwd, *flags):
    return run_python([*flags, "-c", textwrap.dedent(code)], cwd).stdout.split()


def test_explicit_registration_is_idempotent():
    import mergekit_drm
    from mergekit import merge_methods

    importlib.reload(mergekit_drm)
    mergekit_drm.register()
    mergekit_drm.register()
    mergekit_drm.register_methods()  # the 0.1.0 name

    method = merge_methods.get("drm")
    assert method.spec.name == "drm"
    assert method.spec.pretty_name == "DRM"
    assert method.spec.reference_url == "https://arxiv.org/abs/2505.23117"
    names = [m.spec.name for m in merge_methods.registered_methods()]
    assert names.count("drm") == 1


def test_hook_registers_without_an_import(tmp_path):
    out = run_code(
        f"""
        import sys
        assert "mergekit_drm.drm.method" not in sys.modules
        import mergekit.merge_methods as m
        print(m.get("drm").spec.name)
        # Fired once, then inert; the module keeps its own loader.
        from mergekit_drm._hook import _Finder
        print([f.armed for f in sys.meta_path if isinstance(f, _Finder)])
        mod = sys.modules["{TARGET}"]
        print(type(mod.__loader__).__name__, mod.__spec__.loader is mod.__loader__)
        """,
        tmp_path,
    )
    assert out == ["drm", "[False]", "SourceFileLoader", "True"], NOT_INSTALLED


@pytest.mark.parametrize("first", ["mergekit_drm.drm.method", "mergekit_drm.mudsc.engine"])
def test_hook_registers_when_a_package_module_loads_mergekit(first, tmp_path):
    # `first` imports mergekit's registry while it is itself half-executed:
    # registration must wait for it, not import it half-done (a warning).
    from mergekit_drm.registration import METHODS

    out = run_code(
        f"""
        import warnings
        warnings.simplefilter("error")
        import {first}
        import mergekit.merge_methods as m
        print(sorted(x.spec.name for x in m.registered_methods() if x.spec.name in {set(METHODS)!r}))
        """,
        tmp_path,
    )
    assert " ".join(out) == str(sorted(METHODS)), NOT_INSTALLED


def test_hook_is_lazy(tmp_path):
    out = run_code(
        """
        import sys
        print("torch" in sys.modules, "mergekit" in sys.modules,
              "mergekit_drm.drm.method" in sys.modules, "mergekit_drm._hook" in sys.modules)
        """,
        tmp_path,
    )
    assert out == ["False", "False", "False", "True"], NOT_INSTALLED


def test_hook_startup_cost(tmp_path):
    """Not a benchmark: a generous bound that catches an eager import (torch
    alone takes ~1 s). Measured as a user's starts run: bytecode cached by an
    earlier start (this suite may run with PYTHONDONTWRITEBYTECODE, which would
    compile the hook from source at each start), the fastest of three starts so
    that a loaded machine descheduling one does not fail it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    times = []
    for _ in range(4):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"],
                              cwd=tmp_path, env=env, capture_output=True, text=True)
        match = re.search(r"import time:\s*(\d+)\s*\|\s*(\d+)\s*\|\s*mergekit_drm\._hook$",
                          proc.stderr, re.M)
        assert match, NOT_INSTALLED
        times.append(int(match.group(2)))  # the package __init__ included
    cumulative_us = min(times[1:])  # the first start writes the bytecode cache
    print(f"mergekit_drm._hook import at start-up: {cumulative_us / 1000:.2f} ms")
    assert cumulative_us < 20_000


def test_hook_registers_at_once_if_mergekit_is_already_loaded(tmp_path):
    # -S: no .pth processing at start; import mergekit first, then let `site`
    # process the .pth files (the hook among them) by hand.
    import mergekit

    site_dir = os.path.dirname(os.path.dirname(mergekit.__file__))
    out = run_code(
        f"""
        import site, sys
        paths = [{site_dir!r}]
        sys.path.extend(paths)
        import mergekit.merge_methods as m
        assert "mergekit_drm._hook" not in sys.modules
        for p in paths:
            site.addsitedir(p)
        print([x.spec.name for x in m.registered_methods()].count("drm"))
        """,
        tmp_path,
        "-S",
    )
    assert out == ["1"], NOT_INSTALLED


def test_hook_delegates_to_other_finders(tmp_path):
    out = run_code(
        f"""
        import importlib.machinery, sys
        calls = []
        class Spy:
            def find_spec(self, name, path, target=None):
                if name == "{TARGET}":
                    calls.append(name)
                    return importlib.machinery.PathFinder.find_spec(name, path, target)
                return None
        sys.meta_path.insert(1, Spy())  # behind the hook
        import mergekit.merge_methods as m
        print(len(calls), m.get("drm").spec.name)
        """,
        tmp_path,
    )
    assert out == ["1", "drm"], NOT_INSTALLED


def test_stale_pth_without_package_is_a_silent_no_op(tmp_path):
    # As if the package were gone (a deleted editable checkout) but its .pth
    # left behind: `site` must not print a traceback at every start.
    import mergekit

    site_dir = os.path.dirname(os.path.dirname(mergekit.__file__))
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "mergekit_drm.pth").write_text(
        open(os.path.join(site_dir, "mergekit_drm.pth")).read()
    )
    proc = run_python(
        ["-S", "-c", f"import site, sys; site.addsitedir({str(stale)!r}); "
                     "print('mergekit_drm' in sys.modules)"],
        tmp_path,
    )
    assert (proc.stdout.split(), proc.stderr) == (["False"], "")


def test_hook_without_package_is_a_silent_no_op(tmp_path):
    # The package blocked after start-up: the hook registers nothing, quietly.
    out = run_code(
        """
        import sys, warnings
        warnings.simplefilter("error")
        sys.modules["mergekit_drm"] = None
        import mergekit.merge_methods as m
        print([x.spec.name for x in m.registered_methods()].count("drm"))
        """,
        tmp_path,
    )
    assert out == ["0"], NOT_INSTALLED


def test_hook_warns_on_other_failures(monkeypatch):
    import mergekit_drm
    from mergekit_drm import _hook

    def broken():
        raise ValueError("boom")

    monkeypatch.setattr(mergekit_drm, "register", broken)
    with pytest.warns(RuntimeWarning, match=r"mergekit-drm.*ValueError: boom"):
        _hook._register()

    monkeypatch.undo()
    # An ImportError from inside the package is a failure too, not a no-op.
    monkeypatch.setitem(sys.modules, "mergekit_drm.drm.method", None)
    with pytest.warns(RuntimeWarning, match=r"ModuleNotFoundError.*mergekit_drm\.drm\.method"):
        _hook._register()


def test_entry_points_match_the_registration_table(tmp_path):
    from mergekit_drm.registration import METHODS

    out = run_code(
        """
        import json
        from importlib.metadata import entry_points
        import mergekit.merge_methods as m
        eps = entry_points(group="mergekit.merge_methods")
        print(json.dumps({ep.name: [ep.value, m.get(ep.name) is ep.load()] for ep in eps}))
        """,
        tmp_path,
    )
    assert {"drm", "mudsc"} <= set(METHODS)
    assert json.loads(" ".join(out)) == {name: [target, True] for name, target in METHODS.items()}
