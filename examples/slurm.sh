#!/bin/bash
# Two machines with four GPUs each: one `gearshift launch` per machine (Slurm starts one task per
# node; each passes its own --machine_rank). Submit with: sbatch examples/slurm.sh
#SBATCH --job-name=gearshift
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${CONFIG:-examples/fsdp.yaml}
# One run directory on the shared file system, the same on every machine: a requeued job (or
# `sbatch` again) resumes it, on whatever number of nodes this job got.
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-4}
PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

if [ -f "$RUN_DIR/config.yaml" ]; then
  VERB=(resume "$RUN_DIR")
else
  VERB=(train "$CONFIG" --run-dir "$RUN_DIR")
fi

srun --kill-on-bad-exit=1 bash -c "gearshift launch \
  --num_processes $PROCESSES --num_machines $SLURM_NNODES --machine_rank \$SLURM_NODEID \
  --main_process_ip $MAIN_IP --main_process_port 29500 -- ${VERB[*]}"
