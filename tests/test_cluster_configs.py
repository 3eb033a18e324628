"""python -m pytest tests/test_cluster_configs.py -q

Every YAML under cluster/ is checked: `ray up` configs against Ray's own cluster-config schema (the same
prepare_config + validate_config that `ray up` runs), KubeRay manifests for the fields KubeRay requires and for
rayVersion == image tag == installed Ray == pyproject's pin. Negative tests show the checks reject broken files.
"""

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
RAY_UP_FILES = sorted(CLUSTER.glob("*.yaml"))
KUBERAY_FILES = sorted(p for p in (CLUSTER / "kuberay").iterdir() if p.name.endswith((".yaml", ".yaml.tmpl")))
IMAGE_RE = re.compile(r"^rayproject/ray(-ml)?:(?P<version>\d+\.\d+\.\d+)(-py3\d+)?(-(gpu|cpu|cu\d+))*$")


def ray_up_check(config: dict) -> dict:
    """What `ray up` does before touching the cloud: fill defaults, then validate against ray-schema.json."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def image_version(image: str) -> str:
    m = IMAGE_RE.match(image)
    assert m, f"image {image!r} is not a pinned rayproject/ray:<version>-... tag"
    return m.group("version")


def pyproject_ray_pin() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text)
    assert m, "pyproject.toml must pin ray==X.Y.Z"
    return m.group(1)


def test_versions_agree():
    assert pyproject_ray_pin() == ray.__version__


# -----------------------------------------------------------------------------
# ray up configs


def test_ray_up_files_exist():
    names = {p.name for p in RAY_UP_FILES}
    assert {"aws-gpu.yaml", "aws-gpu-spot.yaml", "gcp-gpu.yaml"} <= names


@pytest.mark.parametrize("path", RAY_UP_FILES, ids=lambda p: p.name)
def test_ray_up_config_valid(path):
    config = yaml.safe_load(path.read_text())
    prepared = ray_up_check(config)
    # Ray version pinned: the docker image tag and the pyproject pin installed by setup_commands
    assert image_version(prepared["docker"]["image"]) == ray.__version__
    assert any("pip install" in c and "nanochat" in c for c in prepared["setup_commands"])
    run_options = " ".join(prepared["docker"].get("run_options", []))
    assert re.search(r"--shm-size=\d+g", run_options), "Ray's object store needs a big /dev/shm"
    # CPU-only head that schedules no training: it advertises zero CPUs
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    # an 8-GPU worker type (p5.48xlarge on AWS, a3-highgpu-8g on GCP) that may scale out
    workers = {n: t for n, t in types.items() if n != prepared["head_node_type"]}
    assert workers
    for t in workers.values():
        nc = t["node_config"]
        machine = nc.get("InstanceType") or nc.get("machineType")
        assert machine in ("p5.48xlarge", "a3-highgpu-8g"), machine
        assert t["max_workers"] >= 2  # multi-node
    # the shared base dir is configured for every node
    assert any("NANOCHAT_BASE_DIR=s3://" in c for c in prepared["setup_commands"])
    assert any("--dashboard-host=0.0.0.0" in c for c in prepared["head_start_ray_commands"])


def test_spot_config_uses_spot_market():
    config = ray_up_check(yaml.safe_load((CLUSTER / "aws-gpu-spot.yaml").read_text()))
    gpu = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in gpu)
    on_demand = ray_up_check(yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text()))
    gpu = [t for n, t in on_demand["available_node_types"].items() if n != on_demand["head_node_type"]]
    assert all("InstanceMarketOptions" not in t["node_config"] for t in gpu)


def test_gcp_gpu_scheduling_terminates_on_maintenance():
    config = ray_up_check(yaml.safe_load((CLUSTER / "gcp-gpu.yaml").read_text()))
    gpu = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    for t in gpu:
        assert isinstance(t["node_config"]["scheduling"], list)  # a list, not a mapping, in GCE's API
        assert t["node_config"]["scheduling"][0]["onHostMaintenance"] == "TERMINATE"


@pytest.mark.parametrize("breakage", ["unknown_top_level_key", "max_workers_not_int", "missing_provider_type",
                                      "bad_head_node_type"])  # fmt: skip
def test_broken_ray_up_config_rejected(breakage):
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    if breakage == "unknown_top_level_key":
        config["max_wrkers"] = 4
    elif breakage == "max_workers_not_int":
        config["max_workers"] = "four"
    elif breakage == "missing_provider_type":
        del config["provider"]["type"]
    else:
        config["head_node_type"] = "no_such_type"
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError, NotImplementedError)):
        ray_up_check(config)


# -----------------------------------------------------------------------------
# KubeRay manifests


def check_cluster_spec(spec: dict, where: str) -> list[str]:
    """Problems in a RayCluster spec (also the rayClusterSpec of a RayJob and rayClusterConfig of a RayService)."""
    errors = []
    version = spec.get("rayVersion")
    if str(version) != ray.__version__:
        errors.append(f"{where}.rayVersion {version!r} != installed Ray {ray.__version__}")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return errors + [f"{where}.headGroupSpec missing"]
    if not isinstance(head.get("rayStartParams"), dict):
        errors.append(f"{where}.headGroupSpec.rayStartParams missing (may be empty, must exist)")
    elif str(head["rayStartParams"].get("num-cpus")) != "0":
        errors.append(f"{where}: the head must advertise num-cpus '0' (no training or serving on it)")
    groups = [("headGroupSpec", head)] + [(f"workerGroupSpecs[{i}]", g) for i, g in
                                          enumerate(spec.get("workerGroupSpecs") or [])]  # fmt: skip
    if len(groups) < 2:
        errors.append(f"{where}.workerGroupSpecs: at least one worker group is required")
    for name, g in groups:
        containers = (((g.get("template") or {}).get("spec") or {}).get("containers")) or []
        if not containers:
            errors.append(f"{where}.{name}.template.spec.containers missing")
            continue
        c = containers[0]
        try:
            if image_version(c.get("image", "")) != str(version):
                errors.append(f"{where}.{name}: image {c.get('image')} does not match rayVersion {version}")
        except AssertionError as e:
            errors.append(f"{where}.{name}: {e}")
        mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts") or []}
        volumes = {v.get("name"): v for v in (g["template"]["spec"].get("volumes") or [])}
        shm = volumes.get(mounts.get("/dev/shm"), {})
        if (shm.get("emptyDir") or {}).get("medium") != "Memory":
            errors.append(f"{where}.{name}: /dev/shm must be an emptyDir with medium: Memory (object store)")
        if name != "headGroupSpec":
            if not g.get("groupName"):
                errors.append(f"{where}.{name}.groupName missing")
            if "rayStartParams" not in g:
                errors.append(f"{where}.{name}.rayStartParams missing")
            lo, n, hi = g.get("minReplicas", 0), g.get("replicas", 0), g.get("maxReplicas", 0)
            if not (isinstance(lo, int) and isinstance(hi, int) and lo <= n <= hi and hi >= 1):
                errors.append(f"{where}.{name}: need minReplicas <= replicas <= maxReplicas, maxReplicas >= 1")
            gpus = ((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
            if str(gpus) != "8":
                errors.append(f"{where}.{name}: GPU workers must request nvidia.com/gpu: 8 (got {gpus!r})")
    return errors


def check_kuberay(doc: dict, template: bool = False) -> list[str]:
    errors = []
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion {doc.get('apiVersion')!r} != 'ray.io/v1'")
    if not (doc.get("metadata") or {}).get("name"):
        errors.append("metadata.name missing")
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "RayCluster":
        errors += check_cluster_spec(spec, "spec")
    elif kind == "RayJob":
        entry = spec.get("entrypoint")
        if not entry:
            errors.append("spec.entrypoint missing")
        if spec.get("submissionMode", "K8sJobMode") not in ("K8sJobMode", "HTTPMode", "InteractiveMode",
                                                            "SidecarMode"):  # fmt: skip
            errors.append(f"spec.submissionMode {spec.get('submissionMode')!r} unknown")
        if not isinstance(spec.get("shutdownAfterJobFinishes", False), bool):
            errors.append("spec.shutdownAfterJobFinishes must be a boolean")
        try:
            env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
            if not isinstance(env, dict):
                errors.append("spec.runtimeEnvYAML must be a YAML mapping")
        except yaml.YAMLError as e:
            errors.append(f"spec.runtimeEnvYAML is not YAML: {e}")
        if "rayClusterSpec" in spec:
            errors += check_cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec")
        elif "clusterSelector" not in spec:
            errors.append("spec.rayClusterSpec or spec.clusterSelector required")
    elif kind == "RayService":
        if "rayClusterConfig" not in spec:
            errors.append("spec.rayClusterConfig missing")
        else:
            errors += check_cluster_spec(spec["rayClusterConfig"], "spec.rayClusterConfig")
        serve = spec.get("serveConfigV2")
        if not template:
            try:
                apps = (yaml.safe_load(serve or "") or {}).get("applications")
                if not apps or not all(a.get("import_path") for a in apps):
                    errors.append("spec.serveConfigV2 needs applications with an import_path")
            except (yaml.YAMLError, AttributeError) as e:
                errors.append(f"spec.serveConfigV2 is not a Serve config: {e}")
    else:
        errors.append(f"kind {kind!r} is not RayCluster, RayJob or RayService")
    return errors


def test_kuberay_files_exist():
    names = {p.name for p in KUBERAY_FILES}
    assert {"raycluster.yaml", "rayjob-speedrun.yaml"} <= names
    assert any(n.startswith("rayservice") for n in names)


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_manifest_valid(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        assert check_kuberay(doc, template=path.name.endswith(".tmpl")) == []


def test_rayjob_entrypoint_is_a_valid_speedrun_command():
    from ray_jobs import speedrun

    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-speedrun.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "ray_jobs/speedrun.py"]
    args = speedrun.parse_args(argv[2:])
    preset = speedrun.resolve_config(args)  # unknown presets or keys raise NanochatError
    assert preset["ray"]["nodes"] * preset["ray"]["gpus_per_node"] >= 8
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert env["env_vars"]["NANOCHAT_BASE_DIR"].startswith("s3://")
    assert "working_dir" in env


@pytest.mark.parametrize("breakage", ["version_mismatch", "image_mismatch", "no_head", "no_shm", "bad_api",
                                      "no_gpus"])  # fmt: skip
def test_broken_kuberay_manifest_rejected(breakage):
    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    spec = doc["spec"]
    if breakage == "version_mismatch":
        spec["rayVersion"] = "2.9.0"
    elif breakage == "image_mismatch":
        spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = "rayproject/ray:2.9.0-py311-gpu"
    elif breakage == "no_head":
        del spec["headGroupSpec"]
    elif breakage == "no_shm":
        spec["headGroupSpec"]["template"]["spec"]["volumes"] = []
    elif breakage == "bad_api":
        doc["apiVersion"] = "ray.io/v1alpha0"
    else:
        del spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert check_kuberay(doc) != []
