#!/usr/bin/env bash
# Tear down the test SLURM: cancel all jobs, stop the daemons (the packages stay).
set -u
scancel --user="$(id -un)" >/dev/null 2>&1 || true
pkill -x slurmd || true
pkill -x slurmctld || true
pkill -x munged || true
echo "slurm: stopped"
