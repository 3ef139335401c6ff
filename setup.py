"""Builds the optional native accelerators; everything else is in pyproject.toml.

- schemas/_native.pyx: the flat-record Avro codec (pure-Python twin: schemas/compiled.py);
- streams/_fastjson.pyx: the worker's changelog JSON writer (twin: the stdlib json encoder).

Why optional: each has a pure-Python twin with the same output, so without a C compiler the
install still succeeds and the twins are used (slower).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers: fall back to the Python codec
            print(f"WARNING: native Avro codec not built ({exc!r}); using the pure-Python codec")

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"WARNING: {ext.name} not built ({exc!r}); using the pure-Python codec")


try:
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension("tokenaudit.schemas._native", ["schemas/_native.pyx"]),
            Extension("tokenaudit.streams._fastjson", ["streams/_fastjson.pyx"]),
        ],
        compiler_directives={"language_level": 3},
        quiet=True,
    )
except ImportError:  # Cython is a build requirement; without it, the Python codec
    ext_modules = []

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
