#!/usr/bin/env bash
# Start an sdkd trainer through accelerate, on one machine or many.
#
#   ./launch.sh [options] TRAINER.py --config CONFIG [key=value ...]
#
# options:
#   --gpus N         processes per machine (default: all visible GPUs, else 1)
#   --nodes N        machines (default 1); with N > 1 also give --node-rank and --main-ip
#   --node-rank R    this machine's rank, 0 .. N-1
#   --main-ip IP     address of the rank-0 machine
#   --port P         rendezvous port on the rank-0 machine (default 29500)
#   --backend B      ddp (default), fsdp or deepspeed
#
# Any number of processes above 1 uses accelerate's --multi_gpu; on a machine without GPUs that
# gives gloo processes on the CPU (accelerate's --cpu --num_processes N would start only one).
set -euo pipefail

gpus=""; nodes=1; rank=0; main_ip=""; port=29500; backend=ddp
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus) gpus="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --node-rank) rank="$2"; shift 2 ;;
    --main-ip) main_ip="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --backend) backend="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then echo "error: no trainer given (e.g. train/kd.py --config configs/toy.yaml)" >&2; exit 2; fi
# A bad config stops here, once, with its one-line error, before any process starts. The trainer's
# --help and --print-config (which win over --check-config) are answered here too, once, and nothing starts.
python "$@" --check-config || exit $?
for arg in "$@"; do
  case "$arg" in -h|--help|--print-config|--check-config) exit 0 ;; esac
done
if [[ -z "$gpus" ]]; then
  gpus=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
total=$(( gpus * nodes ))
args=(--num_processes "$total" --num_machines "$nodes" --machine_rank "$rank" --main_process_port "$port")
# Every value accelerate would otherwise default, and list in a warning block. The trainer sets mixed
# precision from its config (train.mixed_precision; the Accelerator's argument wins over the launcher's).
args+=(--mixed_precision no --dynamo_backend no)
if (( nodes > 1 )); then
  [[ -n "$main_ip" ]] || { echo "error: --nodes $nodes needs --main-ip" >&2; exit 2; }
  args+=(--main_process_ip "$main_ip")
fi
case "$backend" in
  ddp) (( total > 1 )) && args+=(--multi_gpu) ;;
  fsdp) args+=(--use_fsdp) ;;
  deepspeed) args+=(--use_deepspeed) ;;
  *) echo "error: --backend '$backend': expected ddp, fsdp or deepspeed" >&2; exit 2 ;;
esac
# accelerate's launcher, through a wrapper that exits 2 when the trainer stopped on a user mistake
# (it has printed its one line) instead of adding a traceback of its own and exiting 1.
exec python -m sdkd.train.launch "${args[@]}" "$@"
