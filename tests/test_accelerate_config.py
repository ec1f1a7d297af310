"""The generated accelerate config is read back by accelerate's own loader."""

from __future__ import annotations

from pathlib import Path

from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType
from conftest import plan_for

from entrypoint import gpus, plan
from recipes import catalog


def written_config(tmp_path: Path, env: dict[str, str], inventory) -> tuple[plan.Plan, Path]:
    p = plan_for(env, catalog.load("smoke"), inventory, str(tmp_path))
    path = next(Path(f) for f in p.files if f.endswith("accelerate_config.yaml"))
    path.parent.mkdir(parents=True)
    path.write_text(p.files[str(path)])
    return p, path


def test_ddp_config_loads_in_accelerate_as_multi_gpu(tmp_path):
    p, path = written_config(tmp_path, {"PARALLELISM": "ddp", "NUM_GPUS": "4"}, gpus.assumed("8x80"))
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert (config.num_processes, config.num_machines, config.machine_rank) == (4, 1, 0)
    assert config.gpu_ids == "0,1,2,3"
    assert config.mixed_precision == p.mixed_precision
    assert config.main_process_port == 0


def test_cpu_ddp_config_loads_in_accelerate(tmp_path):
    _, path = written_config(tmp_path, {"CPU_PROCESSES": "2"}, [])
    config = load_config_from_file(str(path))
    assert config.num_processes == 2 and config.use_cpu is False and config.gpu_ids == "all"
