"""Resolve a user's SPEC, `package.module:Name` or `path/to/file.py:Name`, to the object it names.

One place for every flag that takes someone else's code (check_layer, and the train scripts'
--linear/--model/--optimizer through bitnet.plugged). Each --path folder goes first on sys.path, so a stub folder
can stand in for a package that is not installed.

A file inside a package (its folder, and each one up to a --path folder, holds __init__.py) is
imported as that package's module, so its relative (`from .quant import`) and absolute
(`from mypkg.quant import`) imports work; the folder above the package goes on sys.path.

Two things must not clash with this repo's own `bitnet` package:
  - a file spec outside a package is loaded under a private module name
    (`_bitnet_user_file_<stem>_<hash>`), so a file called bitnet.py, model.py or check_layer.py
    is not confused with an import of ours;
  - a `bitnet.x:Name` spec whose `bitnet` lives in a --path folder (several real BitNet stacks
    call their package that) is imported with our `bitnet` modules stepped aside, then its
    modules are kept under the alias `_bitnet_user.*` and ours are put back. A file inside such
    a package (their_repo/src/bitnet/linear.py) is imported the same way.
"""
import hashlib
import importlib
import importlib.util
import os
import sys

USER_ALIAS = "_bitnet_user"


class SpecError(ValueError):
    """A SPEC that cannot be resolved; the message is one line naming the problem and the fix."""


def split_spec(spec: str) -> tuple[str, str]:
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise SpecError(f"SPEC {spec!r} must be 'package.module:Name' or 'path/to/file.py:Name'")
    return target, name


def add_paths(paths) -> None:
    """Put each folder first on sys.path (the first --path ends up first)."""
    for path in reversed([os.path.abspath(p) for p in paths or ()]):
        if not os.path.isdir(path):
            raise SpecError(f"--path {path!r} is not a folder")
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    importlib.invalidate_caches()


def load_file(path: str):
    """Import a .py file under a private name; its own folder is importable for its siblings."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise SpecError(f"no file {path!r}; give an existing path/to/file.py:Name")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"_bitnet_user_file_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    add_paths([os.path.dirname(path)])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def package_module(path: str, paths) -> tuple[str, str] | None:
    """(dotted module name, the folder above its top package) for a file inside a package: each
    folder from the file's up holds __init__.py, up to (not including) a --path folder."""
    folder, parts = os.path.dirname(os.path.abspath(path)), [os.path.splitext(os.path.basename(path))[0]]
    stops = {os.path.abspath(p) for p in paths or ()}
    while folder not in stops and os.path.isfile(os.path.join(folder, "__init__.py")):
        parts.insert(0, os.path.basename(folder))
        folder = os.path.dirname(folder)
    if len(parts) == 1 or not all(p.isidentifier() for p in parts):
        return None
    return ".".join(parts), folder


def from_folder(module, folder: str) -> bool:
    return os.path.abspath(getattr(module, "__file__", None) or "").startswith(folder + os.sep)


def load_package_file(path: str, paths):
    """Import a file that sits in a package as that package's module (None: load it alone)."""
    found = package_module(path, paths)
    if found is None:
        return None
    dotted, root = found
    top = dotted.split(".")[0]
    if top != __package__ and top in sys.modules and not from_folder(sys.modules[top], root):
        return None  # another package of that name is already imported: load the file alone
    add_paths([root, os.path.dirname(os.path.abspath(path))])  # its siblings stay importable by bare name too
    return import_beside_ours(dotted, top, root) if top == __package__ else importlib.import_module(dotted)


def shadows_our_package(top: str, paths) -> bool:
    """Does a --path folder hold a package or module named `top` (e.g. the user's own bitnet)?"""
    return any(os.path.isfile(os.path.join(p, top, "__init__.py")) or os.path.isfile(os.path.join(p, top + ".py"))
               for p in paths or ())


def import_beside_ours(module_name: str, top: str, folder: str = ""):
    """Import the user's `top` package (found in `folder`) while ours steps aside; keep theirs under USER_ALIAS."""
    def owned(name):
        return name == top or name.startswith(top + ".")

    ours = {k: v for k, v in sys.modules.items() if owned(k)}
    for k in ours:
        del sys.modules[k]
    # the user's modules imported before from this folder come back under their own names, so that
    # --model, --linear and --optimizer from one package share its classes instead of re-importing it
    for k, v in list(sys.modules.items()):
        if (k == USER_ALIAS or k.startswith(USER_ALIAS + ".")) and folder and from_folder(v, folder):
            sys.modules[top + k[len(USER_ALIAS):]] = v
    try:
        module = importlib.import_module(module_name)
    finally:
        for k in [k for k in sys.modules if owned(k)]:
            sys.modules[USER_ALIAS + k[len(top):]] = sys.modules.pop(k)
        sys.modules.update(ours)
    return module


def resolve_spec(spec: str, paths=()):
    """The object SPEC names. Raises SpecError with a one-line reason on any failure."""
    target, name = split_spec(spec)
    add_paths(paths)
    try:
        if target.endswith(".py") or os.sep in target:
            if not os.path.isfile(target):
                raise SpecError(f"no file {os.path.abspath(target)!r}; give an existing path/to/file.py:Name")
            module = load_package_file(target, paths) or load_file(target)
        else:
            top = target.split(".")[0]
            if top == __package__ and shadows_our_package(top, paths):
                folder = next(os.path.abspath(p) for p in paths if shadows_our_package(top, [p]))
                module = import_beside_ours(target, top, folder)
            else:
                module = importlib.import_module(target)
    except SpecError:
        raise
    except Exception as e:  # the user's code can fail to import in any way: say which, in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SpecError(f"cannot import {target!r} for {spec!r}: {type(e).__name__}: {first} "
                        f"(is its folder on --path?)") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise SpecError(f"{target!r} has no {name!r} (SPEC {spec!r})") from None
