"""Unit tests of the two runtime files, which are scripts, not an installed package.

`load` imports one of them from the repository root by its path (seccomp-gen.py
has a dash, so no `import` statement can name it).  Each file is loaded once per
session and every test file gets that same module object: separate copies
would have separate classes (isinstance across files fails) and separate
module state.  The module is not put in sys.modules, so seccomp-gen.py's own
`import bypass4netns` still finds only the file beside it.
"""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]

_loaded = {}  # file name -> module


def load(filename, name):
    """ROOT/filename as a module called name, executed on the first call only."""
    module = _loaded.get(filename)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, ROOT / filename)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[filename] = module
    elif module.__name__ != name:
        raise ValueError("%s is already loaded as %s, not %s" % (filename, module.__name__, name))
    return module
