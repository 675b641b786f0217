#!/bin/sh
# Drop from a freshly installed virtualenv what only building and testing need, so that the
# runtime image holds the code that runs (the Dockerfile's builder stages call this; it needs
# `strip` from binutils, which only the builder has):
#   - pip (nothing is installed at run time; the root filesystem is read-only anyway);
#   - libclang: the clang bindings tensorflow lists for its build tools, never imported;
#   - tensorflow/include: C++ headers for building custom ops;
#   - kubernetes/aio: the client's asyncio copy (skinlesion.kube uses the sync client);
#   - the libraries' own test suites (`tests` packages);
#   - with --strip (the CPU target): the symbol tables of tensorflow's shared libraries (about
#     250 MB; strip --strip-unneeded keeps the dynamic symbols that loading needs). Only
#     tensorflow's: the other wheels' libraries were rewritten by auditwheel (patchelf), and
#     strip breaks those (numpy's OpenBLAS: "ELF load command address/offset not
#     page-aligned"). The GPU target's libraries, whose CUDA kernels cannot be tried on a
#     machine without a GPU, are left as shipped.
# It ends by importing every top-level dependency, so a library broken by this fails the build.
set -eu
venv=${1:?usage: slim-venv.sh VENV [--strip]}
python="$venv/bin/python"
site=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

"$python" -m pip uninstall -y -q libclang
rm -rf "$site/tensorflow/include" "$site/kubernetes/aio"
find "$site" -type d -name tests -prune -exec rm -rf {} +
if [ "${2:-}" = --strip ]; then
  find "$site/tensorflow" -type f -name '*.so*' -exec strip --strip-unneeded {} +
fi
"$python" -m pip uninstall -y -q pip
"$python" -c "import tensorflow, keras, numpy, pandas, scipy, sklearn, matplotlib, PIL, h5py, \
boto3, kubernetes, structlog, tqdm, yaml, mlflow; print('slim-venv: imports ok, tensorflow', tensorflow.__version__)"
