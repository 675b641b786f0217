#!/bin/sh
# Drop from a freshly installed virtualenv what only building and testing need, and what
# nothing in skinlesion runs, so that the runtime image holds the code that runs (the
# Dockerfile's builder stages call this; it needs `strip` from binutils, which only the
# builder has):
#   - the packaging and build tools: pip (nothing is installed at run time; the root
#     filesystem is read-only anyway), setuptools and wheel (listed by tensorflow and
#     astunparse, imported by neither), numpy.distutils, and libclang (the clang bindings
#     tensorflow lists for its build tools). numpy.f2py stays: `from numpy import *`
#     (scipy's array API layer) loads it;
#   - what only building against a library needs: tensorflow/include (C++ headers for custom
#     ops), and C/C++/Cython sources, headers, static libraries and type stubs (.c .cc .cpp
#     .h .pyx .pxd .pxi .a .pyi) that wheels ship beside their compiled modules;
#   - kubernetes/aio, the client's asyncio copy (skinlesion.kube uses the sync client), and
#     the asyncio HTTP stack only it needs (aiohttp and its helpers);
#   - botocore's models of the AWS services boto3 is not used for: skinlesion/storage/s3.py
#     is its only importer (an import contract) and makes S3 clients only; STS, SSO and
#     sign-in models stay for the credential chain (IRSA web identities, SSO profiles);
#   - the libraries' own test suites (`tests` packages);
#   - with --strip (the CPU target): the symbol tables of tensorflow's shared libraries (about
#     250 MB; strip --strip-unneeded keeps the dynamic symbols that loading needs). Only
#     tensorflow's: the other wheels' libraries were rewritten by auditwheel (patchelf), and
#     strip breaks those (numpy's OpenBLAS: "ELF load command address/offset not
#     page-aligned"). The GPU target's libraries, whose CUDA kernels cannot be tried on a
#     machine without a GPU, are left as shipped.
# It ends by importing every top-level dependency and making an S3 and an STS client, so a
# library broken by this fails the build.
set -eu
venv=${1:?usage: slim-venv.sh VENV [--strip]}
python="$venv/bin/python"
site=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

"$python" -m pip uninstall -y -q libclang setuptools wheel aiohttp aiohttp-retry \
  aiohappyeyeballs aiosignal frozenlist multidict propcache yarl
rm -rf "$site/tensorflow/include" "$site/kubernetes/aio" "$site/numpy/distutils"
find "$site" -path "$site/nvidia" -prune -o -type f \( -name '*.c' -o -name '*.cc' \
  -o -name '*.cpp' -o -name '*.h' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' \
  -o -name '*.a' -o -name '*.pyi' \) -exec rm -f {} +
find "$site/botocore/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts ! -name sso \
  ! -name sso-oidc ! -name signin -exec rm -rf {} +
find "$site" -type d -name tests -prune -exec rm -rf {} +
if [ "${2:-}" = --strip ]; then
  find "$site/tensorflow" -type f -name '*.so*' -exec strip --strip-unneeded {} +
fi
"$python" -m pip uninstall -y -q pip
"$python" -c "import tensorflow, keras, numpy, pandas, scipy, sklearn, matplotlib, PIL, h5py, \
kubernetes.client, structlog, tqdm, yaml, mlflow, boto3; \
[boto3.client(s, region_name='us-east-1') for s in ('s3', 'sts')]; \
print('slim-venv: imports ok, tensorflow', tensorflow.__version__)"
