#!/usr/bin/env bash
# CI: make sure a real Slurm answers before tests/test_slurm.py runs, or fail loudly.
#
# Uses ../shared/slurm-localhost/up.sh (beside the repository; SLURM_UP overrides the path), which installs Debian's
# slurm + munge and starts slurmctld and one slurmd per emulated node (n1, n2: 2 CPUs each) on this host, as root.
# Nothing is done when a cluster already answers (and has the PMIx plugin's library when WITH_MPI=1).
# Settings: WITH_MPI (default 1: Open MPI + libpmix, so `srun --mpi=pmix` works), NNODES (2), CPUS_PER_NODE (2),
# SLURM_CI_SKIP=1 to skip on purpose (tests/test_slurm.py then skips, saying why).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UP=${SLURM_UP:-$REPO/../shared/slurm-localhost/up.sh}
export WITH_MPI=${WITH_MPI:-1} NNODES=${NNODES:-2} CPUS_PER_NODE=${CPUS_PER_NODE:-2}

say() { echo "[ci_up] $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

if [ "${SLURM_CI_SKIP:-0}" = 1 ]; then
  say "SLURM_CI_SKIP=1: not bringing up Slurm; tests/test_slurm.py will skip"
  exit 0
fi

answers() {  # controller up and NNODES nodes idle
  command -v sinfo >/dev/null && scontrol ping 2>/dev/null | grep -q UP &&
    [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -ge "$NNODES" ]
}
has_pmix() { ls /usr/lib/*/pmix2/lib/libpmix.so >/dev/null 2>&1 || ls /usr/lib/pmix2/lib/libpmix.so >/dev/null 2>&1; }

if answers && { [ "$WITH_MPI" != 1 ] || has_pmix; }; then
  say "Slurm already up: $(sinfo -h -N -o '%N %t' | tr '\n' ' ')"
else
  [ -f "$UP" ] || fail "no Slurm answers and $UP does not exist (set SLURM_UP=/path/to/up.sh, or SLURM_CI_SKIP=1)"
  [ "$(id -u)" = 0 ] || fail "$UP must run as root (it installs packages and starts slurmctld/slurmd); this is uid $(id -u)"
  if answers; then  # up, but without the PMIx library: slurmd must be restarted after it is installed
    say "Slurm is up without libpmix; restarting it with WITH_MPI=1"
    bash "$(dirname "$UP")/down.sh" || true
  fi
  say "bringing up Slurm: WITH_MPI=$WITH_MPI NNODES=$NNODES CPUS_PER_NODE=$CPUS_PER_NODE bash $UP"
  bash "$UP" >&2 || fail "$UP exited $?"
  answers || fail "after $UP, sinfo does not show $NNODES idle nodes: $(sinfo -N 2>&1 | tr '\n' ' ')"
fi

# A real job across the nodes, not only a controller that answers.
# shellcheck disable=SC2016  # expanded on the node
out=$(timeout 60 srun -N "$NNODES" --ntasks-per-node=1 bash -c 'echo $SLURMD_NODENAME' 2>&1) \
  || fail "srun across $NNODES nodes failed: $out"
say "srun ran on: $(echo "$out" | sort | tr '\n' ' ')"
if [ "$WITH_MPI" = 1 ]; then
  srun --mpi=list 2>&1 | grep -q pmix || fail "WITH_MPI=1 but srun has no pmix plugin: $(srun --mpi=list 2>&1 | tr '\n' ' ')"
  out=$(timeout 60 srun --mpi=pmix -N "$NNODES" --ntasks-per-node=1 true 2>&1) || fail "srun --mpi=pmix failed: $out"
  say "srun --mpi=pmix works"
fi
