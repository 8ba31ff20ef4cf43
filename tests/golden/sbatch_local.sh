#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=2
#SBATCH --job-name=scalestudy-study
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/RUN/slurm/%j_0_log.out
#SBATCH --partition=debug
#SBATCH --signal=USR2@90
#SBATCH --time=60
#SBATCH --wckey=submitit

# setup
[ -f /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] && export LD_PRELOAD="/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4${LD_PRELOAD:+:$LD_PRELOAD}" TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /RUN/slurm/%j_%t_log.out python -u -m submitit.core._submit /RUN/slurm
