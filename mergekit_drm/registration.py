"""Registration of this package's methods in mergekit's registry.

mergekit 0.1.5 raises on a duplicate name, and registration can be reached
twice (the import hook, then an explicit ``mergekit_drm.register()``) or from
several threads, so it checks under a lock first. The import hook loads this
module at every interpreter start, so it imports only builtins (``_thread``
rather than ``threading``, a few milliseconds less on each start).

Registering also probes, once, the mergekit internals the guards need
(``compat.check_host``): a missing one is reported here (or, for a module
mergekit is still importing, at the first planning call), never silently.
"""

import _thread

# Method name -> "module:attribute" of its mergekit MergeMethod. A new method
# is one line here (and one in pyproject's `mergekit.merge_methods` entry points).
METHODS = {
    "drm": "mergekit_drm.drm.method:drm_merge_method",
    "mudsc": "mergekit_drm.mudsc.method:mudsc_merge_method",
    "tsv_m": "mergekit_drm.tsv_m.method:tsv_m_merge_method",
    "iso_c": "mergekit_drm.iso.method:iso_c_merge_method",
    "iso_cts": "mergekit_drm.iso.method:iso_cts_merge_method",
}
METHOD_NAMES = tuple(METHODS)

_lock = _thread.allocate_lock()


def load_method(target: str):
    """The object a METHODS target (\"module:attribute\") names."""
    import importlib

    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


def register() -> None:
    """Register every method of this package that is not registered yet."""
    from mergekit import merge_methods

    from mergekit_drm.compat import check_host

    check_host()  # warns (MERGEKIT_DRM_STRICT_HOST=1: raises) for a missing internal

    methods = [load_method(target) for target in METHODS.values()]
    with _lock:
        present = {method.spec.name for method in merge_methods.registered_methods()}
        for method in methods:
            if method.spec.name not in present:
                merge_methods.register(method)
