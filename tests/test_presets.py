"""The GPU presets (conf/*gpu*.yaml) and the cluster configs (cluster/*.yaml) agree on one set of paths.

The layout: models are read from `/mnt/models/<name>`, everything a job writes goes under
`/mnt/shared/gen-ssd/<run>/`, and every node of every cluster config mounts both (fine-tuning
workers write checkpoint shards, beam managers journal, engines on any node load the models).
Each preset is loaded through the real typed loader with its job's schema, then:

- every local path a GPU preset reads or writes is absolute and mounted on every node of every
  cluster config (a relative path would land in the job's throw-away working-dir copy);
- every data folder it reads (`data.path`) is written by another preset (its `output.dir`, or a stage
  folder of a pipeline's `output_dir`); a model folder is either on the models volume or written by
  another preset (a fine-tuned `output.dir/model`);
- no two presets write the same folder or one inside another's;
- the GPU pipeline preset puts the teacher, the scorer, fine-tuning and evaluation on GPUs;
- a cluster config's own entrypoint (KubeRay) runs a preset whose paths pass the same checks.
"""

from __future__ import annotations

import functools
import importlib
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from gen_ssd_ray.common.config import load_config
from tests.test_cluster_configs import _docs, _ray_cluster_specs
from tests.test_config import JOB_SCHEMAS

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "conf").glob("*.yaml"))
GPU_PRESETS = [p for p in PRESETS if "gpu" in p.name]
CLUSTER_CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))
MODELS = PurePosixPath("/mnt/models")
RUNS = PurePosixPath("/mnt/shared/gen-ssd")
# Keys whose value is a model folder (the others read are data).
MODEL_KEYS = {"teacher.model", "student.model", "model.path", "model.model", "teacher", "student"}


def load_preset(path: Path, overrides: list[str] | None = None) -> tuple[str, Any]:
    """(job, typed config) of a preset: the job named in its header, its schema's loader."""
    header = path.read_text().split("\n\n")[0]
    job = re.search(r"jobs\.(\w+)", header)
    assert job and job.group(1) in JOB_SCHEMAS, f"{path.name}: the header must name python -m jobs.<job>"
    module, name = JOB_SCHEMAS[job.group(1)]
    return job.group(1), load_config(path, overrides, getattr(importlib.import_module(module), name))


def preset_paths(job: str, cfg: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(paths read, paths written), by key, of a loaded preset."""
    if job == "generate":
        reads = {
            "teacher.model": cfg.teacher.model,
            "student.model": cfg.student.model,
            "data.path": cfg.data.path,
        }
        return reads, {"output.dir": cfg.output.dir}
    if job == "finetune":
        return {"model.path": cfg.model.path, "data.path": cfg.data.path}, {"output.dir": cfg.output.dir}
    if job == "evaluate":
        return {"model.model": cfg.model.model, "data.path": cfg.data.path}, {"output.dir": cfg.output.dir}
    if job == "pipeline":  # the pipeline links the stages itself (model paths, distill data, folders)
        reads = {"teacher": cfg.teacher, "student": cfg.student}
        sections = ["cold_start", "generate", "evaluate"]
        if cfg.teacher.startswith("lab:"):
            sections.append("teacher_train")
        reads.update({f"{s}.data.path": getattr(cfg, s).data.path for s in sections})
        return reads, {"output_dir": cfg.output_dir}
    if job == "export":
        reads = {f"inputs[{i}]": path for i, path in enumerate(cfg.inputs)}
        return reads, {"output.dir": cfg.output.dir}
    raise AssertionError(f"no paths known for job {job}")


def is_local(path: str) -> bool:
    """A path on a node's file system (not embedded:/lab: data shipped with the code, not a URI)."""
    return not (path.startswith(("embedded:", "lab:")) or "://" in path)


def under(path: str | PurePosixPath, root: str | PurePosixPath) -> bool:
    path, root = PurePosixPath(path), PurePosixPath(root)
    return path == root or root in path.parents


def _volume_targets(options: list[str]) -> set[str]:
    """Container paths of `docker run` options' `-v SRC:DST[:MODE]` mounts."""
    targets = set()
    for opt in options:
        tokens = shlex.split(opt)
        for flag, value in zip(tokens, tokens[1:], strict=False):
            if flag in ("-v", "--volume"):
                targets.add(value.split(":")[1])
    return targets


def node_mounts(path: Path) -> dict[str, set[str]]:
    """Mount points by node group of one cluster config: a KubeRay object's head and worker groups
    (their containers' volumeMounts), or a cluster-launcher config's head and worker node types (its
    Docker volumes)."""
    groups: dict[str, set[str]] = {}
    for doc in _docs(path):
        for spec in _ray_cluster_specs(doc):
            pods = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
            for name, group in pods:
                containers = group["template"]["spec"]["containers"]
                groups[name] = {m["mountPath"] for c in containers for m in c.get("volumeMounts") or []}
        if "head_start_ray_commands" in doc:
            docker = doc.get("docker")
            assert docker, f"{path.name}: without a docker block this test cannot tell what each node mounts"
            common = _volume_targets(docker.get("run_options") or [])
            for node_type in doc["available_node_types"]:
                role = "head" if node_type == doc["head_node_type"] else "worker"
                groups[node_type] = common | _volume_targets(docker.get(f"{role}_run_options") or [])
    assert groups, f"{path.name}: not a cluster config this test knows"
    return groups


def unmounted(path: str) -> list[str]:
    """The `cluster config: node group` pairs on which `path` is under no mount."""
    return [
        f"{c.name}: {group}"
        for c in CLUSTER_CONFIGS
        for group, mounts in node_mounts(c).items()
        if not any(under(path, m) for m in mounts)
    ]


@functools.cache
def all_writes() -> dict[str, dict[str, str]]:
    """Every folder each preset writes: preset name -> {key: path} (loaded once; configs are frozen)."""
    return {p.name: preset_paths(*load_preset(p))[1] for p in PRESETS}


def writes_of_others(preset: str) -> dict[str, str]:
    """Every folder a preset other than `preset` writes: `<preset> <key>` -> path."""
    return {f"{name} {k}": v for name, w in all_writes().items() if name != preset for k, v in w.items()}


def path_problems(name: str, job: str, cfg: Any) -> list[str]:
    """What is wrong with the paths of one loaded GPU preset (or a cluster entrypoint's config)."""
    reads, writes = preset_paths(job, cfg)
    written = {k: v for k, v in writes_of_others(name).items() if is_local(v)}
    problems = []
    for key, path in {**reads, **writes}.items():
        if not is_local(path):
            continue
        if not path.startswith("/"):
            problems.append(f"{key}={path} is relative: on a cluster it lands in the job's working-dir copy")
            continue
        missing = unmounted(path)
        if missing:
            problems.append(f"{key}={path} is not mounted on: {', '.join(missing)}")
    for key, path in reads.items():
        if not is_local(path) or any(under(path, w) for w in written.values()):
            continue
        if key in MODEL_KEYS:
            if not under(path, MODELS):
                problems.append(
                    f"{key}={path}: a model folder is read from {MODELS}/<name> or a preset's output"
                )
        else:
            problems.append(
                f"{key}={path} is written by no preset (outputs: {sorted(written.values())}); point it at "
                "one of them"
            )
    for key, path in writes.items():
        if is_local(path) and (not under(path, RUNS) or PurePosixPath(path) == RUNS):
            problems.append(f"{key}={path}: a job writes under {RUNS}/<run>")
    return problems


def test_there_are_gpu_presets_and_cluster_configs():
    assert {p.name for p in GPU_PRESETS} >= {"gpu_cluster.yaml", "finetune_gpu.yaml", "pipeline_gpu.yaml"}
    assert {p.name for p in CLUSTER_CONFIGS} >= {"ray-cluster.yaml", "rayjob.yaml"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_through_its_jobs_loader(path):
    job, cfg = load_preset(path)
    reads, writes = preset_paths(job, cfg)
    assert all(isinstance(v, str) and v for v in [*reads.values(), *writes.values()])


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_every_node_mounts_the_models_and_the_shared_folder(path):
    for group, mounts in node_mounts(path).items():
        for root in (MODELS, RUNS):
            assert any(under(root, m) for m in mounts), f"{path.name}: {group} does not mount {root}"


@pytest.mark.parametrize("path", GPU_PRESETS, ids=lambda p: p.name)
def test_gpu_preset_reads_what_is_written_or_mounted(path):
    job, cfg = load_preset(path)
    assert path_problems(path.name, job, cfg) == []


def test_presets_write_separate_folders():
    writes = {
        f"{name} {key}": path
        for name, w in all_writes().items()
        for key, path in w.items()
        if is_local(path) and path.startswith("/")
    }
    for a, pa in writes.items():
        for b, pb in writes.items():
            assert a == b or not under(pa, pb), f"{a}={pa} is inside {b}={pb}: two jobs would share a folder"


def test_finetune_preset_reads_the_generation_presets_output():
    _, gen = load_preset(ROOT / "conf" / "gpu_cluster.yaml")
    _, ft = load_preset(ROOT / "conf" / "finetune_gpu.yaml")
    assert ft.data.path == gen.output.dir and ft.model.path == gen.student.model


def test_gpu_pipeline_places_every_stage_on_gpus():
    _, cfg = load_preset(ROOT / "conf" / "pipeline_gpu.yaml")
    assert cfg.generate.teacher.num_gpus >= cfg.generate.teacher.tensor_parallel_size >= 1
    assert cfg.generate.student.num_gpus > 0  # the scorer
    for section in (cfg.cold_start, cfg.distill):
        assert section.runtime.gpus_per_worker > 0 and section.deepspeed.precision == "bf16"
    assert cfg.evaluate.model.num_gpus > 0
    _, gen = load_preset(ROOT / "conf" / "gpu_cluster.yaml")
    assert (cfg.teacher, cfg.student) == (gen.teacher.model, gen.student.model)


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_entrypoint_runs_a_preset_with_agreeing_paths(path):
    entrypoints = [
        s.get("entrypoint") for s in (d.get("spec") or {} for d in _docs(path)) if s.get("entrypoint")
    ]
    for entrypoint in entrypoints:
        args = shlex.split(entrypoint)
        config = args[args.index("--config") + 1]
        overrides = [a for a in args[args.index("--config") + 2 :] if "=" in a]
        preset = ROOT / config
        assert preset.is_file(), f"{path.name}: the entrypoint's --config {config} is not a preset"
        job, cfg = load_preset(preset, overrides)
        assert f"jobs.{job}" in entrypoint
        assert path_problems(preset.name, job, cfg) == [], f"{path.name} entrypoint: {entrypoint}"


def test_path_checks_catch_a_folder_nobody_writes_or_mounts():
    # the check itself: finetune_gpu.yaml as it was (reading and writing /mnt/outputs, mounted nowhere)
    job, cfg = load_preset(
        ROOT / "conf" / "finetune_gpu.yaml",
        ["data.path=/mnt/outputs/gsm8k-train-gen-ssd", "output.dir=/mnt/outputs/finetune-gen-ssd"],
    )
    problems = path_problems("finetune_gpu.yaml", job, cfg)
    assert any(
        p.startswith("data.path=/mnt/outputs/gsm8k-train-gen-ssd is written by no preset") for p in problems
    )
    assert any(p.startswith("output.dir=/mnt/outputs/finetune-gen-ssd is not mounted on: ") for p in problems)
    job, cfg = load_preset(ROOT / "conf" / "finetune_gpu.yaml", ["output.dir=outputs/ft"])
    assert any("is relative" in p for p in path_problems("finetune_gpu.yaml", job, cfg))
