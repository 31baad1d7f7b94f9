"""Registers mergekit-drm's merge methods whenever mergekit loads its registry.

mergekit 0.1.5 has no plugin discovery, so plain ``mergekit-yaml`` (and any
worker process it spawns) would never see ``merge_method: drm``. The installed
``mergekit_drm.pth`` imports this module at every interpreter start, so it must
cost next to nothing: it and the package ``__init__`` import only the standard
library, never torch or mergekit. It only puts a finder at the front of
``sys.meta_path`` that waits for ``mergekit.merge_methods`` and, once that
module has finished executing, calls ``mergekit_drm.register()``. When a
module of this package is what imported mergekit (``from mergekit_drm.drm.method
import ...`` as a program's first import), registering at that moment would
import it half-executed; registration then waits until no module of the package
is executing, watching their imports the same way.
"""

import sys

_TARGET = "mergekit.merge_methods"
_PACKAGE = "mergekit_drm."
_pending = False  # mergekit is loaded, registration waits for our modules


def _busy(done: str) -> bool:
    """Whether a module of this package other than ``done`` is mid-import."""
    return any(
        name.startswith(_PACKAGE) and name != done
        and getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
    )


def _loaded(name: str) -> None:
    """Called after ``name`` (mergekit's registry or one of ours) has executed."""
    global _pending
    if name != _TARGET and not _pending:
        return
    _pending = _busy(name)
    if not _pending:
        _register()


def _register():
    try:
        import mergekit_drm
    except ModuleNotFoundError as exc:
        # The package is being torn down or was blocked (sys.modules entry
        # None): nothing to register, and nothing worth a warning.
        if exc.name == "mergekit_drm":
            return
        _warn(exc)
        return
    except Exception as exc:
        _warn(exc)
        return
    try:
        mergekit_drm.register()
    except Exception as exc:
        _warn(exc)


def _warn(exc):
    # A broken plugin must not break mergekit's other methods, but it must not
    # fail silently either: `merge_method: drm` would then be "Unimplemented".
    import warnings

    warnings.warn(
        f"mergekit-drm: could not register its merge methods with mergekit "
        f"({type(exc).__name__}: {exc}); `merge_method: drm` is unavailable",
        RuntimeWarning,
        stacklevel=2,
    )


class _Loader:
    """Runs the real loader, then registers; delegates everything else."""

    _loader = None  # keeps __getattr__ from recursing on a half-built copy

    def __init__(self, loader, finder, name):
        self._loader = loader
        self._finder = finder
        self._name = name

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        try:
            self._loader.exec_module(module)
        except BaseException:
            # The import failed and may be retried from scratch: wait for it.
            if self._name == _TARGET:
                self._finder.armed = True
            raise
        finally:
            # Hand the module back its own loader so nothing of ours stays
            # visible (reload, importlib.resources, isinstance checks).
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._loader
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self._loader
        _loaded(self._name)


class _Finder:
    """Meta path finder that fires once for ``mergekit.merge_methods`` (and,
    until registration is done, for this package's modules).

    After firing it stays in ``sys.meta_path`` but inert: removing it would
    shift the list under another thread's import that is iterating it, which
    could then skip a finder.
    """

    armed = True

    def find_spec(self, fullname, path, target=None):
        if fullname == _TARGET and self.armed:
            self.armed = False
        elif not (fullname.startswith(_PACKAGE) and (self.armed or _pending)):
            return None
        # Delegate to whichever finder would have handled the import without
        # us (PathFinder, an editable-install finder, ...), in their order.
        for finder in tuple(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            # Namespace package or legacy loader: nothing we can wrap safely.
            return spec
        spec.loader = _Loader(spec.loader, self, fullname)
        return spec


def install():
    """Install the finder, or register at once if mergekit is loaded already."""
    module = sys.modules.get(_TARGET)
    if module is not None:
        if not getattr(getattr(module, "__spec__", None), "_initializing", False):
            _register()
        # Mid-import (a thread importing it right now): our finder would come
        # too late; that import's caller can call `mergekit_drm.register()`.
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
