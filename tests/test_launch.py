"""launch.sh: the strategies' accelerate config files and the command it builds (--dry-run: nothing starts)."""

from __future__ import annotations

import shlex

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from conftest import ROOT, run_script

STRATEGIES = ["single", "ddp", "fsdp", "fsdp_offload", "zero2", "zero3"]


def dry_run(*args: str):
    return run_script(["bash", "launch.sh", "--dry-run", *args], timeout=60)


def launched(*args: str) -> list[str]:
    result = dry_run(*args)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return shlex.split(result.stdout)


@pytest.mark.parametrize("name, kind, settings", [
    ("single", DistributedType.NO, {}),
    ("ddp", DistributedType.MULTI_GPU, {}),
    ("fsdp", DistributedType.FSDP, {"fsdp_version": 2, "fsdp_reshard_after_forward": True,
                                    "fsdp_offload_params": False, "fsdp_state_dict_type": "SHARDED_STATE_DICT"}),
    ("fsdp_offload", DistributedType.FSDP, {"fsdp_version": 2, "fsdp_reshard_after_forward": True,
                                            "fsdp_offload_params": True}),
    ("zero2", DistributedType.DEEPSPEED, {"zero_stage": 2}),
    ("zero3", DistributedType.DEEPSPEED, {"zero_stage": 3}),
])
def test_each_strategy_file_is_an_accelerate_config_of_its_kind(name, kind, settings):
    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type == kind
    section = config.fsdp_config if kind == DistributedType.FSDP else config.deepspeed_config
    assert {key: section[key] for key in settings} == settings


def test_dry_run_prints_the_accelerate_command_of_every_option():
    command = launched("--strategy", "fsdp", "--gpus", "4", "--nodes", "2", "--node-rank", "1",
                       "--main-addr", "10.0.0.7", "--main-port", "29400",
                       "train/kd.py", "--config", "configs/toy.yaml", "sample.prompts=[a cat]")
    assert command == ["accelerate", "launch", "--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"),
                       "--num_processes", "8", "--num_machines", "2", "--machine_rank", "1",
                       "--main_process_port", "29400", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_ip", "10.0.0.7",
                       "train/kd.py", "--config", "configs/toy.yaml", "sample.prompts=[a cat]"]


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_dry_run_names_the_strategy_file(strategy):
    command = launched("--strategy", strategy, "--gpus", "2", "train/kd.py")
    assert command[command.index("--config_file") + 1] == str(ROOT / "configs" / "accelerate" / f"{strategy}.yaml")
    assert command[command.index("--num_processes") + 1] == "2"


def test_the_older_options_still_work_and_ddp_on_one_process_is_single():
    command = launched("--backend", "deepspeed", "--gpus", "2", "--nodes", "2", "--node-rank", "0",
                       "--main-ip", "host0", "--port", "1234", "train/kd.py")
    assert command[3].endswith("/zero2.yaml")
    assert command[command.index("--main_process_ip") + 1] == "host0"
    assert command[command.index("--main_process_port") + 1] == "1234"
    assert launched("--gpus", "1", "train/kd.py")[3].endswith("/single.yaml")
    assert launched("--backend", "ddp", "--gpus", "2", "train/kd.py")[3].endswith("/ddp.yaml")


@pytest.mark.parametrize("args, error", [
    (["--strategy", "zero1", "--gpus", "2"],
     "--strategy 'zero1': expected single, ddp, fsdp, fsdp_offload, zero2 or zero3"),
    (["--strategy", "single", "--gpus", "2"], "--strategy single runs one process; --gpus 2 x --nodes 1 is 2"),
    (["--gpus", "2", "--nodes", "2", "--node-rank", "1"], "--nodes 2 needs --main-addr"),
])
def test_a_wrong_option_is_one_line_and_exit_2(args, error):
    result = dry_run(*args, "train/kd.py")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [f"error: {error}"]


@pytest.mark.slow
def test_deepspeed_without_its_package_or_a_gpu_stops_in_one_line(tmp_path):
    """Where DeepSpeed cannot run (not installed; or no CUDA GPU, where accelerate 1.15 would quietly start DDP
    instead) a zero2 launch exits 2 without a traceback, its error line naming why; DeepSpeed training itself is not
    run here."""
    import importlib.util

    import torch

    result = run_script(["bash", "launch.sh", "--strategy", "zero2", "--gpus", "1", "train/kd.py", "--config",
                         "configs/toy.yaml", f"output_dir={tmp_path}"], timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    if importlib.util.find_spec("deepspeed") is None:
        error = "--strategy zero2: DeepSpeed is not installed (pip install deepspeed; it needs CUDA GPUs)"
    elif not torch.cuda.is_available():
        error = ("launch.sh --strategy zero2/zero3: DeepSpeed needs CUDA GPUs, and this machine has none; "
                 "use --strategy ddp or fsdp")
    else:
        pytest.skip("DeepSpeed and a CUDA GPU are here: nothing to refuse")
    assert result.stderr.strip().splitlines()[-1] == f"error: {error}"
