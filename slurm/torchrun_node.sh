#!/bin/bash
# One per node under LAUNCHER=torchrun (slurm/pretrain.sbatch): runs "$@" (torchrun ...) and keeps the signal
# protocol working through it. Slurm signals every process of the step; torchrun's agent would die of SIGUSR1
# (default action), so it runs with SIGUSR1 ignored: its workers install their own handler and checkpoint.
# torchrun reports the workers' exit 124 as 1: when a signal came, a failure is reported as 124 (requeue).
got=0
trap 'got=1' USR1 TERM
(trap '' USR1; exec "$@") &
pid=$!
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
wait "$pid"; rc=$?
if [ "$rc" -ne 0 ] && [ "$got" = 1 ]; then rc=124; fi
exit "$rc"
