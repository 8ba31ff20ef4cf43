#!/bin/bash

# Parameters
#SBATCH --account=my-project
#SBATCH --constraint=a100
#SBATCH --cpus-per-task=4
#SBATCH --gpus-per-node=8
#SBATCH --job-name=scalestudy-study
#SBATCH --mem=491520M
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output=/RUN/slurm/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=normal
#SBATCH --signal=USR2@90
#SBATCH --time=720
#SBATCH --wckey=submitit

# setup
module load cuda/12.1
source /shared/envs/scalestudy/bin/activate
[ -f /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] && export LD_PRELOAD="/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4${LD_PRELOAD:+:$LD_PRELOAD}" TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /RUN/slurm/%j_%t_log.out python -u -m submitit.core._submit /RUN/slurm
