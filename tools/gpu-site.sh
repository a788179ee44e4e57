# Sourced by the GPU scripts: on a machine with no package index, the project's
# dependencies travel as wheels in $WHEELS (default .whl/, Python 3.12 there) and are
# installed into /tmp/site, first on PYTHONPATH; elsewhere `pip install -e .` is enough.
wheels=${WHEELS:-.whl}
site=
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl || exit 1
  site=/tmp/site
fi
export PYTHONUNBUFFERED=1
