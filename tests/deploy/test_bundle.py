"""The Databricks Asset Bundle's structure (no Databricks access here): it parses, every task points at an existing
entry point, the tasks form the pipeline DAG, only embed runs on the GPU cluster, and the Unity Catalog names agree
with conf/databricks.yaml."""
from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest
import yaml

from tokens2policy.stages import STAGES, STAGE_NAMES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle():
    root = yaml.safe_load((REPO / "databricks.yml").read_text())
    resources = {}
    files = sorted({p for pattern in root["include"] for p in glob.glob(str(REPO / pattern))})
    assert files, "databricks.yml includes no resource files"
    for path in files:
        doc = yaml.safe_load(Path(path).read_text())
        for kind, items in doc["resources"].items():
            for name, spec in items.items():
                assert (kind, name) not in resources, f"{kind}.{name} defined twice"
                resources[(kind, name)] = (Path(path), spec)
    return root, resources


def _jobs(bundle):
    return {name: v for (kind, name), v in bundle[1].items() if kind == "jobs"}


def _entry_points(base: Path, task: dict):
    if "spark_python_task" in task:
        yield base / task["spark_python_task"]["python_file"]
    if "notebook_task" in task:
        nb = base / task["notebook_task"]["notebook_path"]
        yield nb if nb.suffix else nb.with_suffix(".py")
    if "python_wheel_task" in task:
        yield None


def test_bundle_targets_and_variables(bundle):
    root, _ = bundle
    assert root["bundle"]["name"] == "tokens2policy"
    assert set(root["targets"]) == {"dev", "prod"}
    assert root["targets"]["dev"]["mode"] == "development" and root["targets"]["dev"].get("default") is True
    assert root["targets"]["prod"]["mode"] == "production"
    used = set()
    for path in [REPO / "databricks.yml", *(REPO.glob("resources/*.yml"))]:
        used |= set(re.findall(r"\$\{var\.(\w+)\}", path.read_text()))
    assert used <= set(root["variables"]), f"undefined variables: {used - set(root['variables'])}"
    for target in root["targets"].values():
        assert set(target.get("variables", {})) <= set(root["variables"])


def test_catalog_names_match_databricks_profile(bundle):
    root, _ = bundle
    prof = yaml.safe_load((REPO / "conf" / "databricks.yaml").read_text())
    assert prof["lakehouse"]["mode"] == "catalog"
    assert root["variables"]["catalog"]["default"] == prof["lakehouse"]["catalog"]
    assert root["variables"]["schema"]["default"] == prof["lakehouse"]["schema"]
    assert root["targets"]["prod"]["variables"]["schema"] == prof["lakehouse"]["schema"]
    # the names reach every pipeline task as config overrides, and the overrides are valid config keys
    from tokens2policy.config import load_config

    for name, (base, spec) in _jobs(bundle).items():
        for task in spec["tasks"]:
            params = task.get("spark_python_task", {}).get("parameters", [])
            sets = [params[i + 1] for i, p in enumerate(params) if p == "--set"]
            if "spark_python_task" in task:
                assert "lakehouse.catalog=${var.catalog}" in sets and "lakehouse.schema=${var.schema}" in sets
                resolved = [s.replace("${var.catalog}", "main").replace("${var.schema}", "t2p")
                            .replace("${var.experiment_name}", "/Shared/x") for s in sets]
                cfg = load_config(REPO / "conf" / "databricks.yaml", resolved)
                assert (cfg.lakehouse.catalog, cfg.lakehouse.schema_) == ("main", "t2p")


def test_every_task_entry_point_exists(bundle):
    for name, (path, spec) in _jobs(bundle).items():
        for task in spec["tasks"]:
            points = list(_entry_points(path.parent, task))
            assert points, f"{name}.{task['task_key']} has no entry point"
            for p in points:
                assert p is not None and p.resolve().is_file(), f"{name}.{task['task_key']}: {p} does not exist"
                if p.suffix == ".py" and "spark_python_task" in task:
                    assert "tokens2policy.cli import main" in p.read_text()
            for lib in task.get("libraries", []):
                assert lib.get("whl", "").endswith(".whl")
    assert "tokens2policy_wheel" in bundle[0]["artifacts"]


def test_pipeline_job_is_the_stage_dag_with_gpu_for_embed_only(bundle):
    jobs = _jobs(bundle)
    _, spec = jobs["tokens2policy_pipeline"]
    tasks = {t["task_key"]: t for t in spec["tasks"]}
    assert list(tasks) == list(STAGE_NAMES)
    # each task depends exactly on the previous stage; the order is a topological order of the stage inputs
    for prev, stage in zip(STAGE_NAMES, STAGE_NAMES[1:]):
        assert [d["task_key"] for d in tasks[stage]["depends_on"]] == [prev]
    assert "depends_on" not in tasks["ingest"]
    producer = {t: s.name for s in STAGES for t in s.outputs}
    position = {n: i for i, n in enumerate(STAGE_NAMES)}
    for s in STAGES:
        for table in s.inputs:
            assert position[producer[table]] < position[s.name]
    for s in STAGES:
        assert tasks[s.name]["spark_python_task"]["python_file"] == f"../jobs/{s.name}.py"
    # clusters: a GPU runtime/node for embed, CPU for all others
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in spec["job_clusters"]}
    root = bundle[0]
    for key, cl in clusters.items():
        gpu = "gpu" in str(cl["spark_version"]).lower() or "gpu" in str(cl["spark_version"])
        runtime = root["variables"][re.match(r"\$\{var\.(\w+)\}", cl["spark_version"]).group(1)]["default"]
        clusters[key] = ("gpu" in runtime, cl)
        del gpu
    for stage, task in tasks.items():
        is_gpu, cl = clusters[task["job_cluster_key"]]
        assert is_gpu == (stage == "embed"), stage
    assert any("embed.device=cuda" == p for p in tasks["embed"]["spark_python_task"]["parameters"])
    assert spec["schedule"]["quartz_cron_expression"] and spec["schedule"]["timezone_id"]
    assert spec["max_concurrent_runs"] == 1


def test_walkthrough_job_runs_the_notebook_with_widget_parameters(bundle):
    from tokens2policy.report.notebook import WIDGETS

    _, spec = _jobs(bundle)["tokens2policy_walkthrough"]
    (task,) = spec["tasks"]
    assert set(task["notebook_task"]["base_parameters"]) == set(WIDGETS)


def test_ml_runtime_per_user_dev_schema_schema_volume_and_run_as(bundle):
    """Every task's cluster runs Databricks Runtime ML (torch, mlflow), dev writes to a schema per user, the bundle
    creates the schema and the data_dir volume it writes to, and prod runs as a service principal."""
    root, resources = bundle
    for name, (_, spec) in _jobs(bundle).items():
        for cluster in spec["job_clusters"]:
            var = re.fullmatch(r"\$\{var\.(\w+)\}", cluster["new_cluster"]["spark_version"]).group(1)
            assert "-ml-" in root["variables"][var]["default"], (name, var)
    assert "${workspace.current_user.short_name}" in root["targets"]["dev"]["variables"]["schema"]
    assert "service_principal_name" in root["targets"]["prod"]["run_as"]
    kinds = {kind: spec for (kind, _), (_, spec) in resources.items()}
    assert kinds["schemas"]["name"] == "${var.schema}" and kinds["schemas"]["catalog_name"] == "${var.catalog}"
    assert kinds["volumes"]["name"] == "${var.volume}" and kinds["volumes"]["volume_type"] == "MANAGED"
    for name, (_, spec) in _jobs(bundle).items():
        for task in spec["tasks"]:
            params = task.get("spark_python_task", {}).get("parameters", [])
            if params:
                assert "data_dir=/Volumes/${var.catalog}/${var.schema}/${var.volume}" in params
