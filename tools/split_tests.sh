#!/usr/bin/env bash
# Sort the flat tests/ folder into tests/unit, tests/property, tests/crash and
# tests/integration, and the shared helpers into a tests/kit package (issue 23), so that each
# folder runs alone (`pytest tests/unit`) and `pytest` still runs them all.
#
# Run once, from anywhere in a clean checkout; it `git mv`s the files, rewrites imports
# (tests.X -> tests.kit.X / tests.<kind>.test_X) and path mentions (tests/X.py in code,
# docs, Makefile, pyproject), fixes the few __file__-relative paths, and stages the result
# for review. tests/conftest.py stays where it is: its fixtures reach every folder.
#
# A test file the lists below do not name stops the script before anything moves: put it
# in one of them (each list says what belongs there).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

# In-process, on real files or bytes alone: no daemon process, no external client.
UNIT="test_bench_rounds test_capabilities test_catalog test_datapath test_space_account test_store test_checker test_devices test_health test_import
  test_iscsi_cdb test_iscsi_proto test_labels test_member_ops test_nbd_proto test_openers
  test_pool_tuning test_portable test_qos test_readcache test_rebuild test_redundancy
  test_repo_docs test_scrub test_sizes test_space test_tuning test_txn
  test_volume_records test_write_buffer"
# Hypothesis programs and seeded model checkers against a model of what must hold.
PROPERTY="test_sm_snapshots test_sm_space test_snapshots test_volume_model
  test_write_concurrency"
# Power cuts simulated on recorded device writes, every crash image checked.
CRASH="test_crash"
# The real daemon, real sockets, real clients (qemu, libnbd tools, fio, libiscsi, FUSE).
INTEGRATION="test_blockdev test_capabilities_frontends test_cli test_concurrency
  test_daemon test_faults test_fuse test_inuse test_iscsi_acl test_iscsi_clients
  test_iscsi_raw test_iscsi_reservations test_members test_nbd_badinput test_nbd_clients
  test_nbd_drain test_nbd_limits test_nbd_tls test_owner test_peers test_portable_cli
  test_progress test_prometheus test_qos_daemon test_qos_fio test_service
  test_space_concurrency test_vm_exports test_vm_libvirt test_vm_migrate test_vm_restart
  test_wrong_commands"
# Helpers shared by tests (modules, and the scripts the system python runs).
KIT="poolkit daemonkit nbdharness nbdworker iscsiharness iscsiraw crashsim trioportal
  nbd_space_client cephkit vmdaemon vmkit"
# tests/rados/ (the RADOS tier against a throwaway Ceph cluster, with its own conftest and
# workers) is a folder already and stays one; only its helper cephkit joins the kit.

if [ -n "$(git status --porcelain -- tests)" ]; then
    echo "split_tests.sh: tests/ has uncommitted changes; commit or stash them first" >&2
    exit 1
fi

declare -A DEST=()
for n in $UNIT; do DEST[$n]=unit; done
for n in $PROPERTY; do DEST[$n]=property; done
for n in $CRASH; do DEST[$n]=crash; done
for n in $INTEGRATION; do DEST[$n]=integration; done
for n in $KIT; do DEST[$n]=kit; done

missing=()
for f in tests/test_*.py; do
    n=$(basename "$f" .py)
    [ -n "${DEST[$n]:-}" ] || missing+=("$f")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "split_tests.sh: not classified (add each to UNIT, PROPERTY, CRASH or INTEGRATION):" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi
for n in "${!DEST[@]}"; do      # listed for a branch not merged yet: nothing to move
    [ -f "tests/$n.py" ] || { echo "split_tests.sh: tests/$n.py is absent, skipped" >&2
                              unset "DEST[$n]"; }
done

declare -A DOC=(
    [unit]="Unit tests: in-process, on real files or bytes alone; no daemon, no external client."
    [property]="Property tests: hypothesis state machines and seeded model checkers against a model."
    [crash]="Crash tests: power cuts simulated on recorded device writes; every crash image checked."
    [integration]="Integration tests: the real daemon, real sockets and real clients."
    [kit]="Helpers shared by the tests: pools, daemons, NBD/iSCSI harnesses, the crash simulator."
)
for d in unit property crash integration kit; do
    mkdir -p "tests/$d"
    printf '"""%s"""\n' "${DOC[$d]}" > "tests/$d/__init__.py"
    git add "tests/$d/__init__.py"
done
for n in "${!DEST[@]}"; do
    git mv "tests/$n.py" "tests/${DEST[$n]}/$n.py"
done

# Imports and dotted names (``from tests.poolkit import``, ``from tests import vmkit``,
# ``python -m tests.iscsiharness``),
# and path mentions (tests/crashsim.py) wherever they are written down.
expr=()
for n in "${!DEST[@]}"; do
    expr+=(-e "s/\\btests\\.$n\\b/tests.${DEST[$n]}.$n/g"
           -e "s/\\bfrom tests import $n\\b/from tests.${DEST[$n]} import $n/g"
           -e "s#\\btests/$n\\.py\\b#tests/${DEST[$n]}/$n.py#g"
           -e "s#\\btests/$n\\b#tests/${DEST[$n]}/$n#g")
done
mapfile -t files < <(git ls-files -- '*.py' '*.md' '*.toml' 'Makefile' '.ci/*')
# The VM tier is named by prefix too (conftest's scheduler groups tests/test_vm_*).
expr+=(-e "s#\\btests/test_vm_#tests/integration/test_vm_#g")
sed -i -E "${expr[@]}" "${files[@]}"

# Paths computed from a test file's own place, now one folder deeper.
sed -i -E -e 's/Path\(__file__\)\.resolve\(\)\.parent\.parent\b/Path(__file__).resolve().parents[2]/g' \
    -e 's/Path\(__file__\)\.parent\.parent\b/Path(__file__).parents[2]/g' tests/*/*.py
for n in $KIT; do
    [ -n "${DEST[$n]:-}" ] || continue
    sed -i -E "s#Path\\(__file__\\)\\.with_name\\(\"$n\\.py\"\\)#Path(__file__).parents[1] / \"kit\" / \"$n.py\"#g" \
        tests/*/*.py
done

# The one line the longer paths push past ruff's 100 columns.
sed -i -E '1s#^("""An asynchronous libnbd client driven over stdin/stdout JSON lines) (\(tests/.*)$#\1\n\2#' \
    tests/kit/nbdworker.py

# Renamed modules sort differently among their imports (ruff's isort rules).
RUFF=${RUFF:-$(command -v ruff || echo .venv/bin/ruff)}
if [ -x "$RUFF" ]; then
    "$RUFF" check --select I --fix -q tests || true
else
    echo "split_tests.sh: no ruff found (set RUFF=...): run 'ruff check --select I --fix tests'" >&2
fi

git add -u
git add tests
echo "split_tests.sh: moved $(( ${#DEST[@]} )) files:"
for d in unit property crash integration kit; do
    printf '  tests/%-12s %s\n' "$d/" "$(ls "tests/$d" | grep -v __init__ | sed 's/\.py$//' | tr '\n' ' ')"
done
echo "then: ruff check . && mypy && pytest --collect-only -q tests/unit (and each folder)"
