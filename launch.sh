#!/usr/bin/env bash
# Start an sdkd trainer through accelerate, on one machine or many.
#
#   ./launch.sh [options] TRAINER.py --config CONFIG [key=value ...]
#
# options:
#   --strategy S     single, ddp (default), fsdp, fsdp_offload, zero2 or zero3: the accelerate config
#                    configs/accelerate/S.yaml (ddp on one process in all is single)
#   --gpus N         processes per machine (default: all visible GPUs, else 1)
#   --nodes N        machines (default 1); with N > 1 also give --node-rank and --main-addr
#   --node-rank R    this machine's rank, 0 .. N-1
#   --main-addr A    address of the rank-0 machine (also --main-ip)
#   --main-port P    rendezvous port on the rank-0 machine (default 29500; also --port)
#   --dry-run        print the `accelerate launch` command and start nothing
#   --backend B      older name: ddp, fsdp or deepspeed (= zero2)
#
# The command runs as `python -m sdkd.train.launch ARGS`: accelerate's launcher with the same ARGS, which
# exits 2 with the trainer's one line when it stopped on a user mistake. With processes above 1 on a
# machine without GPUs, ddp and fsdp run gloo processes on the CPU.
set -euo pipefail

strategy=""; gpus=""; nodes=1; rank=0; main_addr=""; port=29500; dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --strategy) strategy="$2"; shift 2 ;;
    --backend)
      case "$2" in deepspeed) strategy=zero2 ;; *) strategy="$2" ;; esac; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --node-rank) rank="$2"; shift 2 ;;
    --main-addr|--main-ip) main_addr="$2"; shift 2 ;;
    --main-port|--port) port="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
here=$(cd "$(dirname "$0")" && pwd)
case "${strategy:=ddp}" in
  single|ddp|fsdp|fsdp_offload|zero2|zero3) ;;
  *) echo "error: --strategy '$strategy': expected single, ddp, fsdp, fsdp_offload, zero2 or zero3" >&2; exit 2 ;;
esac
if [[ $# -eq 0 ]]; then echo "error: no trainer given (e.g. train/kd.py --config configs/toy.yaml)" >&2; exit 2; fi
if (( ! dry_run )); then
  # A bad config stops here, once, with its one-line error, before any process starts. The trainer's
  # --help and --print-config (which win over --check-config) are answered here too, once, and nothing starts.
  python "$@" --check-config || exit $?
  for arg in "$@"; do
    case "$arg" in -h|--help|--print-config|--check-config) exit 0 ;; esac
  done
  if [[ "$strategy" == zero* ]] && ! python -c "import deepspeed" 2>/dev/null; then
    echo "error: --strategy $strategy: DeepSpeed is not installed (pip install deepspeed; it needs CUDA GPUs)" >&2
    exit 2
  fi
fi
if [[ -z "$gpus" ]]; then
  gpus=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
total=$(( gpus * nodes ))
if [[ "$strategy" == single ]] && (( total > 1 )); then
  echo "error: --strategy single runs one process; --gpus $gpus x --nodes $nodes is $total" >&2; exit 2
fi
[[ "$strategy" == ddp ]] && (( total == 1 )) && strategy=single
args=(--config_file "$here/configs/accelerate/$strategy.yaml" --num_processes "$total" --num_machines "$nodes"
      --machine_rank "$rank" --main_process_port "$port")
# Every value accelerate would otherwise default, and list in a warning block. The trainer sets mixed
# precision from its config (train.mixed_precision; the Accelerator's argument wins over the launcher's).
args+=(--mixed_precision no --dynamo_backend no)
if (( nodes > 1 )); then
  [[ -n "$main_addr" ]] || { echo "error: --nodes $nodes needs --main-addr" >&2; exit 2; }
  args+=(--main_process_ip "$main_addr")
fi
if (( dry_run )); then
  printf '%q ' accelerate launch "${args[@]}" "$@" | sed 's/ $//'; echo
  exit 0
fi
# accelerate's launcher, through a wrapper that exits 2 when the trainer stopped on a user mistake
# (it has printed its one line) instead of adding a traceback of its own and exiting 1.
exec python -m sdkd.train.launch "${args[@]}" "$@"
