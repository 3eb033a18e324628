"""python -m pytest tests/test_cluster_configs.py -q

Static checks of everything in cluster/ that a schema cannot catch, plus the schemas themselves:
- `ray up` configs: Ray's own prepare_config + validate_config (what `ray up` runs before touching the cloud), Ray's
  AWS network-interface bootstrap, then our rules: a pinned AMI (never `latest_dlami`), an instance profile on every
  node type, EFA on p5 node types (32 interfaces, /dev/infiniband, memlock, FI_PROVIDER, the OFI NCCL plugin), GPU
  node types that scale from 0, the one project image, no pip install at node start; GCP: driver install + wait, a
  disk type A3 accepts, a dedicated service account.
- The image: cluster/Dockerfile pins its base (Ray version, Python, CUDA), torch (version + CUDA index), the kernels
  package, the EFA installer, and pre-fetches the FA3 kernel that nanochat/flash_attention.py names.
- KubeRay: every manifest (the base files and both kustomize overlays rendered with `kubectl kustomize`) validated
  against the OpenAPI schemas of the KubeRay v1.7.0 CRDs (tests/fixtures/kuberay-v1.7.0, unknown fields rejected
  as the API server does with strict field validation), then our rules: the project image, service accounts instead
  of required static keys, worker requests that fit the machine types' allocatable resources, a 1-GPU serve group,
  Redis GCS fault tolerance, a RayJob deadline, no pip in runtime envs.
Each rule has a negative test; the rules also fire on the configs as they were before (tests/fixtures/cluster).
"""

import copy
import functools
import gzip
import inspect
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
FIXTURES = ROOT / "tests" / "fixtures"
RAY_UP_FILES = sorted(CLUSTER.glob("*.yaml"))
AWS_FILES = [p for p in RAY_UP_FILES if p.name.startswith("aws")]
KUBERAY = CLUSTER / "kuberay"
KUBERAY_CR_FILES = [KUBERAY / n for n in ("raycluster.yaml", "rayjob-speedrun.yaml", "rayservice-chat.yaml")]
OVERLAYS = {"eks": CLUSTER / "kuberay-overlays" / "eks", "gke": CLUSTER / "kuberay-overlays" / "gke"}
KUBERAY_VERSION = "v1.7.0"
BUCKET = "YOUR-BUCKET"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(path: Path):
    return yaml.load(path.read_text(), Loader=Loader)


def project_image() -> str:
    m = re.search(r"^NANOCHAT_IMAGE=(\S+)$", (CLUSTER / "image.env").read_text(), re.M)
    assert m, "cluster/image.env must define NANOCHAT_IMAGE=registry/name:tag"
    return m.group(1)


def image_problems(image: str, where: str) -> list[str]:
    """The one project image, with an explicit tag that is not a moving one."""
    problems = []
    if image != project_image():
        problems.append(f"{where}: image {image!r} is not the project image {project_image()!r} (cluster/image.env)")
    tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
    if not tag or tag in ("latest", "nightly") or "@" in image and not image.split("@")[1].startswith("sha256:"):
        problems.append(f"{where}: image {image!r} is not pinned to a tag")
    return problems


def ray_up_check(config: dict) -> dict:
    """What `ray up` does before touching the cloud: fill defaults, then validate against ray-schema.json."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")  # fmt: skip
    out = [c for k in keys for c in config.get(k) or []]
    for t in config["available_node_types"].values():
        out += [c for k in ("initialization_commands", "worker_setup_commands") for c in t.get(k) or []]
    return out


def docker_options(config: dict, node_type: str) -> list[str]:
    d = config.get("docker") or {}
    opts = list(d.get("run_options") or [])
    if node_type == config["head_node_type"]:
        return opts + list(d.get("head_run_options") or [])
    t = config["available_node_types"][node_type]
    return (
        opts + list(d.get("worker_run_options") or []) + list((t.get("docker") or {}).get("worker_run_options") or [])
    )


def common_problems(config: dict) -> list[str]:
    problems = image_problems((config.get("docker") or {}).get("image", ""), "docker.image")
    for key in ("head_image", "worker_image"):
        if key in (config.get("docker") or {}):
            problems += image_problems(config["docker"][key], f"docker.{key}")
    for name, t in config["available_node_types"].items():
        if "worker_image" in (t.get("docker") or {}):
            problems += image_problems(t["docker"]["worker_image"], f"{name}.docker.worker_image")
        if name != config["head_node_type"] and t.get("min_workers", 0) != 0:
            problems.append(f"{name}: min_workers must be 0 (idle GPU nodes cost money; the autoscaler adds them)")
    for cmd in commands(config):
        if re.search(r"\bpip3?\s+install\b|\buv\s+pip\b", cmd):
            problems.append(f"a node command installs packages at start ({cmd!r}): they belong in the image")
    return problems


EFA_INTERFACES = {"p5.48xlarge": 32, "p5e.48xlarge": 32, "p5en.48xlarge": 16, "p4d.24xlarge": 4}


def aws_problems(config: dict) -> list[str]:
    """Rules a `ray up` AWS config must follow to reach the first training step on 8xH100 nodes."""
    problems = common_problems(config)
    provider = config.get("provider") or {}
    if any("NetworkInterfaces" in (t.get("node_config") or {}) for t in config["available_node_types"].values()):
        if not (provider.get("use_internal_ips") and provider.get("use_external_head_ip")):
            problems.append("provider: nodes with many network interfaces get no public IP, so Ray must reach the "
                            "workers at internal IPs (use_internal_ips) and the head at its public one "
                            "(use_external_head_ip)")  # fmt: skip
    for name, t in config["available_node_types"].items():
        nc = t.get("node_config") or {}
        ami = str(nc.get("ImageId", ""))
        if not re.fullmatch(r"ami-[0-9a-f]{8,17}", ami):
            problems.append(f"{name}: ImageId {ami!r} is not a pinned AMI id (never latest_dlami: Ray maps it to an "
                            f"Ubuntu 18.04 / CUDA 11.2 image)")  # fmt: skip
        profile = nc.get("IamInstanceProfile") or {}
        if not (profile.get("Arn") or profile.get("Name")) and name == config["head_node_type"]:
            problems.append(f"{name}: no IamInstanceProfile (Ray would attach ray-autoscaler-v1: full EC2 and S3 "
                            f"access, far wider than the bucket)")  # fmt: skip
        elif not (profile.get("Arn") or profile.get("Name")):
            problems.append(f"{name}: no IamInstanceProfile (Ray gives its default profile to the head only; this "
                            f"node could not read or write the bucket)")  # fmt: skip
        itype = nc.get("InstanceType", "")
        if itype in EFA_INTERFACES:
            nics = nc.get("NetworkInterfaces") or []
            efa = [n for n in nics if n.get("InterfaceType") in ("efa", "efa-only")]
            cards = {n.get("NetworkCardIndex") for n in efa}
            if len(efa) != EFA_INTERFACES[itype] or len(cards) != EFA_INTERFACES[itype]:
                problems.append(f"{name}: {itype} needs {EFA_INTERFACES[itype]} EFA interfaces, one per network card "
                                f"(has {len(efa)}): without them NCCL falls back to TCP sockets")  # fmt: skip
            opts = " ".join(docker_options(config, name))
            for needed, why in (("--device=/dev/infiniband", "the EFA devices in the container"),
                                ("memlock=-1", "unlimited locked memory for EFA"),
                                ("FI_PROVIDER=efa", "libfabric's EFA provider"),
                                ("NCCL_NET_PLUGIN=ofi", "the aws-ofi-nccl plugin from the image")):  # fmt: skip
                if needed not in opts.replace("--device /dev", "--device=/dev"):
                    problems.append(f"{name}: docker options lack {needed} ({why})")
    return problems


A3_DISK_TYPES = ("pd-balanced", "pd-ssd", "hyperdisk-balanced", "hyperdisk-extreme", "hyperdisk-ml")


def gcp_problems(config: dict) -> list[str]:
    problems = common_problems(config)
    for name, t in config["available_node_types"].items():
        nc = t.get("node_config") or {}
        for sa in nc.get("serviceAccounts") or [{}]:
            if sa.get("email", "default") == "default":
                problems.append(f"{name}: use a dedicated service account with access to the bucket only")
        for disk in nc.get("disks") or []:
            dtype = str((disk.get("initializeParams") or {}).get("diskType", "pd-standard")).rsplit("/", 1)[-1]
            if nc.get("machineType", "").startswith("a3-") and dtype not in A3_DISK_TYPES:
                problems.append(f"{name}: A3 machines do not take disk type {dtype!r} (use {A3_DISK_TYPES})")
        if nc.get("machineType", "").startswith(("a3-", "a2-", "g2-")):
            items = {i.get("key"): str(i.get("value")) for i in (nc.get("metadata") or {}).get("items") or []}
            if items.get("install-nvidia-driver", "").lower() != "true":
                problems.append(
                    f"{name}: the Deep Learning VM boots without a driver unless install-nvidia-driver=True"
                )
            if not any("nvidia-smi" in c for c in t.get("initialization_commands") or []):
                problems.append(f"{name}: initialization_commands must wait for nvidia-smi before docker starts")
    return problems


# -----------------------------------------------------------------------------
# ray up configs


def test_versions_agree():
    m = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert m and m.group(1) == ray.__version__


def test_ray_up_files_exist():
    assert {"aws-gpu.yaml", "aws-gpu-spot.yaml", "gcp-gpu.yaml"} <= {p.name for p in RAY_UP_FILES}


@pytest.mark.parametrize("path", RAY_UP_FILES, ids=lambda p: p.name)
def test_ray_up_config_valid(path):
    config = load(path)
    prepared = ray_up_check(config)
    problems = aws_problems(config) if prepared["provider"]["type"] == "aws" else gcp_problems(config)
    assert problems == []
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")  # no training on the head
    workers = {n: t for n, t in types.items() if n != prepared["head_node_type"]}
    for t in workers.values():
        nc = t["node_config"]
        assert (nc.get("InstanceType") or nc.get("machineType")) in ("p5.48xlarge", "a3-highgpu-8g")
        assert t["max_workers"] >= 2  # multi-node
        assert re.search(r"--shm-size=\d+g", " ".join(docker_options(prepared, next(iter(workers)))))
    opts = " ".join(prepared["docker"]["run_options"])
    assert f"NANOCHAT_BASE_DIR=s3://{BUCKET}/nanochat" in opts  # every node, every Ray worker process
    head_opts = " ".join(docker_options(prepared, prepared["head_node_type"]))
    assert "RAY_PROMETHEUS_HOST=" in head_opts and "RAY_GRAFANA_HOST=" in head_opts
    starts = prepared["head_start_ray_commands"]
    assert any("--dashboard-host=0.0.0.0" in c and "--metrics-export-port=" in c for c in starts)
    assert any("cluster/monitoring/start-monitoring.sh" in c for c in starts)


def test_aws_efa_interfaces_go_through_rays_bootstrap():
    """Ray's own AWS bootstrap step moves each interface's subnet/groups up: it must accept the p5 node types."""
    from ray.autoscaler._private.aws.config import _configure_node_type_from_network_interface

    for path in AWS_FILES:
        config = load(path)
        gpu = config["available_node_types"]["gpu_8x_h100"]
        out = _configure_node_type_from_network_interface(gpu)["node_config"]
        assert out["SubnetIds"] and out["SecurityGroupIds"] and len(out["SubnetIds"]) == 32


def test_spot_config_is_the_on_demand_config_with_spot_workers():
    spot, on_demand = load(CLUSTER / "aws-gpu-spot.yaml"), load(CLUSTER / "aws-gpu.yaml")
    for name, t in spot["available_node_types"].items():
        market = t["node_config"].get("InstanceMarketOptions", {})
        assert market.get("MarketType") == ("spot" if name != spot["head_node_type"] else None)
        t["node_config"].pop("InstanceMarketOptions", None)
        assert t == on_demand["available_node_types"][name]
    assert "InstanceMarketOptions" not in on_demand["available_node_types"]["gpu_8x_h100"]["node_config"]


def test_gcp_gpu_scheduling_terminates_on_maintenance():
    config = load(CLUSTER / "gcp-gpu.yaml")
    gpu = config["available_node_types"]["gpu_8x_h100"]
    assert gpu["node_config"]["scheduling"][0]["onHostMaintenance"] == "TERMINATE"  # a list in GCE's API
    assert gpu["resources"]["GPU"] == 8  # GCP does not auto-fill resources


def test_s3_policy_is_scoped_to_the_bucket():
    """The instance profiles' S3 policy names the bucket and its objects, nothing wider; the configs use it."""
    policy = json.loads((CLUSTER / "aws" / "s3-bucket-policy.json").read_text())
    resources = {r for s in policy["Statement"] for r in ([s["Resource"]] if isinstance(s["Resource"], str)
                                                          else s["Resource"])}  # fmt: skip
    assert resources == {f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"}
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert "s3:*" not in actions and {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
    head = json.loads((CLUSTER / "aws" / "head-autoscaler-policy.json").read_text())
    passrole = [s for s in head["Statement"] if s["Action"] == "iam:PassRole"]
    assert passrole and passrole[0]["Resource"].endswith(":role/nanochat-ray-worker")  # only the worker role
    for path in AWS_FILES:
        profiles = {t["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
                    for t in load(path)["available_node_types"].values()}  # fmt: skip
        assert profiles == {"nanochat-ray-head", "nanochat-ray-worker"}
    setup = (CLUSTER / "aws" / "setup.sh").read_text()
    assert "s3-bucket-policy.json" in setup and "head-autoscaler-policy.json" in setup
    subprocess.run(["bash", "-n", str(CLUSTER / "aws" / "setup.sh")], check=True)


def test_configs_before_this_change_fail_the_rules():
    """The rules catch what was wrong with the AWS config and KubeRay manifest as they were (schema-valid both)."""
    before = load(FIXTURES / "cluster" / "aws-gpu-before.yaml")
    ray_up_check(before)  # Ray's schema accepted it
    problems = "\n".join(aws_problems(before))
    for expected in ("is not a pinned AMI id", "no IamInstanceProfile", "needs 32 EFA interfaces", "not the project image",
                     "min_workers must be 0", "installs packages at start"):  # fmt: skip
        assert expected in problems, problems
    doc = load(FIXTURES / "cluster" / "raycluster-before.yaml")
    assert crd_errors(doc) == []  # KubeRay's schema accepted it too
    problems = "\n".join(kuberay_problems(doc))
    for expected in ("not the project image", "serviceAccountName", "static keys"):
        assert expected in problems, problems


@pytest.mark.parametrize("breakage", ["latest_dlami", "no_instance_profile", "no_efa_interfaces", "no_infiniband",
                                      "unpinned_image", "stock_image", "pip_at_start", "min_workers",
                                      "public_ips"])  # fmt: skip
def test_aws_rules_reject(breakage):
    config = load(CLUSTER / "aws-gpu.yaml")
    head, gpu = config["available_node_types"]["head"], config["available_node_types"]["gpu_8x_h100"]
    if breakage == "latest_dlami":
        gpu["node_config"]["ImageId"] = "latest_dlami"
    elif breakage == "no_instance_profile":
        del head["node_config"]["IamInstanceProfile"]
    elif breakage == "no_efa_interfaces":
        del gpu["node_config"]["NetworkInterfaces"]
    elif breakage == "no_infiniband":
        gpu["docker"]["worker_run_options"].remove("--device=/dev/infiniband")
    elif breakage == "unpinned_image":
        config["docker"]["image"] = project_image().rsplit(":", 1)[0] + ":latest"
    elif breakage == "stock_image":
        config["docker"]["image"] = "rayproject/ray:2.60.0-py311-gpu"
    elif breakage == "pip_at_start":
        config["setup_commands"] = ["pip install -q torch"]
    elif breakage == "public_ips":
        del config["provider"]["use_internal_ips"]
    else:
        gpu["min_workers"] = 1
    ray_up_check(config)  # still schema-valid: only our rules see it
    expected = {
        "latest_dlami": "not a pinned AMI id",
        "no_instance_profile": "head: no IamInstanceProfile",
        "no_efa_interfaces": "needs 32 EFA interfaces",
        "no_infiniband": "lack --device=/dev/infiniband",
        "unpinned_image": "not pinned to a tag",
        "stock_image": "not the project image",
        "pip_at_start": "installs packages at start",
        "min_workers": "min_workers must be 0",
        "public_ips": "use_internal_ips",
    }[breakage]
    problems = aws_problems(config)
    assert problems and all(expected in p or "not the project image" in p for p in problems), problems
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("breakage", ["no_driver", "no_wait", "pd_standard", "default_sa"])
def test_gcp_rules_reject(breakage):
    config = load(CLUSTER / "gcp-gpu.yaml")
    gpu = config["available_node_types"]["gpu_8x_h100"]
    if breakage == "no_driver":
        gpu["node_config"]["metadata"]["items"] = []
    elif breakage == "no_wait":
        gpu["initialization_commands"] = []
    elif breakage == "pd_standard":
        del gpu["node_config"]["disks"][0]["initializeParams"]["diskType"]
    else:
        gpu["node_config"]["serviceAccounts"][0]["email"] = "default"
    expected = {
        "no_driver": "install-nvidia-driver",
        "no_wait": "wait for nvidia-smi",
        "pd_standard": "'pd-standard'",
        "default_sa": "dedicated service account",
    }[breakage]
    problems = gcp_problems(config)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize("breakage", ["unknown_top_level_key", "max_workers_not_int", "missing_provider_type",
                                      "bad_head_node_type"])  # fmt: skip
def test_broken_ray_up_config_rejected_by_rays_schema(breakage):
    config = load(CLUSTER / "aws-gpu.yaml")
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
# The image


def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def dockerfile_args() -> dict:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile(), re.M))


def test_dockerfile_pins_base_torch_and_plugins():
    text, args = dockerfile(), dockerfile_args()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu(\d\d)(\d)", base)
    assert m, f"base image {base!r} must be rayproject/ray:<version>-py3xx-cu12x"
    assert (
        m.group(1) == ray.__version__ and f"{m.group(2)}.{m.group(3)}" == f"{sys.version_info[0]}.{sys.version_info[1]}"
    )
    base_cuda = f"cu{m.group(4)}{m.group(5)}"
    assert base_cuda.startswith("cu12")  # CUDA 12.x: H100 drivers >= 570 run it
    # torch: an exact version from the CUDA index that matches the base image's CUDA; never an unpinned install
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    assert args["TORCH_INDEX"] == f"https://download.pytorch.org/whl/{base_cuda}"
    assert '"torch==${TORCH_VERSION}" --index-url ${TORCH_INDEX}' in text
    for line in re.findall(r"pip install[^\n]*", text):
        assert not re.search(r"(?<![\w=\"-])torch(?![=\w-])", line), f"unpinned torch: {line}"
    assert "torch==${TORCH_VERSION}" in text and "-c /tmp/constraints.txt" in text  # the project keeps that torch
    assert "pip install -e" not in text and '"/opt/nanochat[gpu]"' in text  # installed, not editable
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["KERNELS_VERSION"]) and re.fullmatch(r"\d+\.\d+\.\d+",
                                                                                    args["EFA_INSTALLER_VERSION"])  # fmt: skip
    assert "aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" in text and "--skip-kmod" in text
    assert "libnccl-net-ofi.so" in text and "/opt/nccl-net" in re.search(r"ENV LD_LIBRARY_PATH=(\S+)", text).group(1)
    assert "RUN python -m nanochat.fa3 --prefetch" in text
    build = (CLUSTER / "build-image.sh").read_text()
    assert "docker build -f cluster/Dockerfile" in build and "docker push" in build
    subprocess.run(["bash", "-n", str(CLUSTER / "build-image.sh")], check=True)
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def test_fa3_prefetch_matches_the_lookup():
    """The image pre-fetches exactly the kernel repos the FA3 lookup can ask the kernel hub for."""
    import torch

    from nanochat import fa3

    looked_up = {fa3.plan(True, cap, torch.bfloat16)[0] for cap in [(8, 0), (8, 6), (8, 9), (9, 0)]}
    assert None not in looked_up
    assert set(inspect.signature(fa3.prefetch).parameters["repos"].default) == looked_up


def test_fa3_prefetch_fails_the_build_without_the_kernel(tmp_path):
    """No network here: the prefetch must exit non-zero without a traceback, so `docker build` stops."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "nanochat.fa3", "--prefetch"], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert out.returncode != 0 and "FAILED" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_every_config_runs_the_one_image():
    image = project_image()
    for path in RAY_UP_FILES:
        assert load(path)["docker"]["image"] == image, path
    kustomization = load(KUBERAY / "kustomization.yaml")
    (entry,) = kustomization["images"]
    assert f"{entry['newName']}:{entry['newTag']}" == image and entry["name"] == image.rsplit(":", 1)[0]


# -----------------------------------------------------------------------------
# KubeRay: the CRDs' OpenAPI schemas, strict


def _strict(schema):
    """The API server's strict field validation: an object with declared properties rejects unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str):
    path = FIXTURES / f"kuberay-{KUBERAY_VERSION}" / f"ray.io_{kind.lower()}s.yaml.gz"
    crd = yaml.load(gzip.decompress(path.read_bytes()), Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") not in ("RayCluster", "RayJob", "RayService"):
        return [f"{doc.get('apiVersion')}/{doc.get('kind')} is not a ray.io/v1 RayCluster, RayJob or RayService"]
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message[:200]}" for e in errors]


def cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = doc.get("spec") or {}
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]
    return [("spec", spec)] if key is None else [(f"spec.{key}", spec[key])] if key in spec else []


def groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec.get("headGroupSpec") or {})] + [
        (g.get("groupName", f"workers[{i}]"), g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])
    ]


def kuberay_problems(doc: dict) -> list[str]:
    """Rules beyond the schema, for one RayCluster / RayJob / RayService."""
    problems = []
    for where, spec in cluster_specs(doc):
        if str(spec.get("rayVersion")) != ray.__version__:
            problems.append(f"{where}.rayVersion {spec.get('rayVersion')!r} != Ray {ray.__version__}")
        if str((spec.get("headGroupSpec") or {}).get("rayStartParams", {}).get("num-cpus")) != "0":
            problems.append(f"{where}: the head must advertise num-cpus '0' (no training or serving on it)")
        for name, g in groups(spec):
            pod = (g.get("template") or {}).get("spec") or {}
            containers = pod.get("containers") or [{}]
            problems += image_problems(containers[0].get("image", ""), f"{where}.{name}")
            if pod.get("serviceAccountName") != "nanochat-ray":
                problems.append(f"{where}.{name}: serviceAccountName must be nanochat-ray (IRSA / Workload Identity)")
            for ref in containers[0].get("envFrom") or []:
                if "secretRef" in ref and not ref["secretRef"].get("optional"):
                    problems.append(f"{where}.{name}: requires a Secret of static keys (make it optional: a fallback)")
            mounts = {m.get("mountPath"): m.get("name") for m in containers[0].get("volumeMounts") or []}
            vols = {v.get("name"): v for v in pod.get("volumes") or []}
            if (vols.get(mounts.get("/dev/shm"), {}).get("emptyDir") or {}).get("medium") != "Memory":
                problems.append(f"{where}.{name}: /dev/shm must be an emptyDir with medium: Memory (object store)")
            if name != "head":
                gpus = str(((containers[0].get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu"))
                if gpus not in ("1", "8"):
                    problems.append(f"{where}.{name}: a worker group requests nvidia.com/gpu 8 (training) or 1 "
                                    f"(serving), got {gpus!r}")  # fmt: skip
                if not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations") or []):
                    problems.append(f"{where}.{name}: no toleration for the GPU nodes' nvidia.com/gpu taint")
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob":
        env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
        if "pip" in env or "uv" in env or "conda" in env:
            problems.append("spec.runtimeEnvYAML installs packages at job start: they belong in the image")
        if not spec.get("activeDeadlineSeconds"):
            problems.append("spec.activeDeadlineSeconds missing: a hung job would hold 8 GPUs forever")
    if doc.get("kind") == "RayService":
        rcc = spec.get("rayClusterConfig") or {}
        if not (rcc.get("gcsFaultToleranceOptions") or {}).get("redisAddress"):
            problems.append(
                "spec.rayClusterConfig.gcsFaultToleranceOptions.redisAddress missing (head restarts drop Serve)"
            )
        gpus = [str(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu"))
                for g in rcc.get("workerGroupSpecs") or []]  # fmt: skip
        if "1" not in gpus:
            problems.append("RayService: no 1-GPU worker group (a 1-GPU replica would start a whole 8-GPU pod)")
        if (spec.get("upgradeStrategy") or {}).get("type", "NewCluster") != "NewCluster":
            problems.append("RayService: upgradeStrategy must be NewCluster (zero-downtime cluster upgrades)")
    return problems


@functools.cache
def rendered(overlay: str) -> tuple:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed: overlays not rendered")
    out = subprocess.run([kubectl, "kustomize", str(OVERLAYS[overlay])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.load_all(out.stdout, Loader=Loader) if d)


def ray_docs(docs) -> list[dict]:
    return [d for d in docs if d.get("apiVersion") == "ray.io/v1"]


def test_kuberay_files_exist():
    assert all(p.exists() for p in KUBERAY_CR_FILES) and all(
        (p / "kustomization.yaml").exists() for p in OVERLAYS.values()
    )


@pytest.mark.parametrize("path", KUBERAY_CR_FILES, ids=lambda p: p.name)
def test_kuberay_manifest_valid(path):
    docs = [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d]
    assert len(docs) == 1
    assert crd_errors(docs[0]) == []
    assert kuberay_problems(docs[0]) == []


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_kuberay_overlay_renders_valid_manifests(overlay):
    docs = rendered(overlay)
    assert {d["kind"] for d in ray_docs(docs)} == {"RayCluster", "RayJob", "RayService"}
    for doc in ray_docs(docs):
        assert crd_errors(doc) == [], doc["kind"]
        assert kuberay_problems(doc) == [], doc["kind"]
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    key = {"eks": "eks.amazonaws.com/role-arn", "gke": "iam.gke.io/gcp-service-account"}[overlay]
    assert sa["metadata"]["annotations"][key]
    selector = {"eks": "node.kubernetes.io/instance-type", "gke": "cloud.google.com/gke-accelerator"}[overlay]
    for doc in ray_docs(docs):
        for _, spec in cluster_specs(doc):
            for name, g in groups(spec)[1:]:
                assert selector in g["template"]["spec"]["nodeSelector"], (doc["kind"], name)


# Allocatable model of one node: the kubelet reservation formulas EKS and GKE document for CPU and memory, a 2 %
# margin for memory the kernel and firmware keep (MemTotal < nominal), and room for the clouds' daemonsets.
MACHINES = {"eks": {"cpu": 192, "mem_gib": 2048}, "gke": {"cpu": 208, "mem_gib": 1872}}
DAEMONSETS = {"cpu": 2.0, "mem_gib": 4.0}


def reserved_cpu(cores: int) -> float:
    return 0.06 + 0.01 + 0.005 * 2 + 0.0025 * max(cores - 4, 0)


def reserved_mem_gib(cloud: str, mem_gib: float) -> float:
    if cloud == "eks":  # 255 MiB + 11 MiB per pod (max pods 250 at the most)
        return (255 + 11 * 250) / 1024
    tiers = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (float("inf"), 0.02)]
    left, total = mem_gib, 0.0
    for size, frac in tiers:
        take = min(left, size)
        total, left = total + take * frac, left - take
    return total


def allocatable(cloud: str) -> tuple[float, float]:
    m = MACHINES[cloud]
    cpu = m["cpu"] - reserved_cpu(m["cpu"]) - DAEMONSETS["cpu"]
    mem = m["mem_gib"] * 0.98 - reserved_mem_gib(cloud, m["mem_gib"] * 0.98) - 0.1 - DAEMONSETS["mem_gib"]
    return cpu, mem


def gib(quantity: str) -> float:
    units = {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi|Ti)", str(quantity))
    return float(m.group(1)) * units[m.group(2)]


def eight_gpu_requests(docs) -> list[tuple[float, float]]:
    out = []
    for doc in ray_docs(docs):
        for _, spec in cluster_specs(doc):
            for _name, g in groups(spec)[1:]:
                req = g["template"]["spec"]["containers"][0]["resources"]["requests"]
                if str(req.get("nvidia.com/gpu")) == "8":
                    out.append((float(req["cpu"]), gib(req["memory"])))
    return out


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_worker_requests_fit_the_gpu_machine_types(overlay):
    """An 8-GPU worker pod must fit one node's allocatable CPU and memory, or it stays Pending forever."""
    cpu, mem = allocatable(overlay)
    requests = eight_gpu_requests(rendered(overlay))
    assert requests
    for c, m in requests:
        assert c <= cpu and m <= mem, (overlay, (c, m), (round(cpu, 1), round(mem, 1)))
        assert c >= 0.9 * cpu and m >= 0.85 * mem  # and use the node: no GPU node left mostly idle
    base = eight_gpu_requests([load(p) for p in KUBERAY_CR_FILES])
    for c, m in base:  # the base manifests, applied without an overlay, fit both machine types
        assert all(c <= allocatable(k)[0] and m <= allocatable(k)[1] for k in MACHINES)
    # the requests before this change (180 CPU / 1800Gi) do not fit an a3-highgpu-8g node
    (old,) = eight_gpu_requests([load(FIXTURES / "cluster" / "raycluster-before.yaml")])
    assert old[1] > allocatable("gke")[1]


def test_rayjob_entrypoint_is_a_valid_speedrun_command_from_the_image():
    from ray_jobs import speedrun

    doc = load(KUBERAY / "rayjob-speedrun.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "ray_jobs.speedrun"]  # the installed package: no working_dir upload
    preset = speedrun.resolve_config(speedrun.parse_args(argv[3:]))
    assert preset["ray"]["nodes"] * preset["ray"]["gpus_per_node"] >= 8
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert env["env_vars"]["NANOCHAT_BASE_DIR"].startswith("s3://") and set(env) == {"env_vars"}
    assert doc["spec"]["activeDeadlineSeconds"] >= 4 * 3600  # above a d24 speedrun's few hours


def test_rayservice_embeds_serve_config():
    doc = load(KUBERAY / "rayservice-chat.yaml")
    assert yaml.safe_load(doc["spec"]["serveConfigV2"]) == load(ROOT / "serve" / "config.yaml")


@pytest.mark.parametrize("breakage", ["no_image", "stock_image", "unknown_field", "wrong_type", "no_sa",
                                      "static_keys", "no_redis", "no_serve_group", "pip_runtime_env",
                                      "no_deadline", "version_mismatch", "no_shm"])  # fmt: skip
def test_broken_kuberay_manifest_rejected(breakage):
    """Each breakage is caught by the CRD schema or by our rules (and by which one is part of the contract)."""
    kind = {"no_redis": "rayservice-chat", "no_serve_group": "rayservice-chat", "pip_runtime_env": "rayjob-speedrun",
            "no_deadline": "rayjob-speedrun"}.get(breakage, "raycluster")  # fmt: skip
    doc = load(KUBERAY / f"{kind}.yaml")
    spec = doc["spec"] if kind == "raycluster" else doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]
    by_schema = breakage in ("no_image_schema", "unknown_field", "wrong_type")
    if breakage == "no_image":
        del worker["containers"][0]["image"]
    elif breakage == "stock_image":
        worker["containers"][0]["image"] = "rayproject/ray:2.60.0-py311-gpu"
    elif breakage == "unknown_field":
        spec["workerGroupSpecs"][0]["maxReplica"] = 4  # typo of maxReplicas
    elif breakage == "wrong_type":
        spec["workerGroupSpecs"][0]["maxReplicas"] = "four"
    elif breakage == "no_sa":
        del worker["serviceAccountName"]
    elif breakage == "static_keys":
        worker["containers"][0]["envFrom"] = [{"secretRef": {"name": "nanochat-secrets"}}]
    elif breakage == "no_redis":
        del spec["gcsFaultToleranceOptions"]
    elif breakage == "no_serve_group":
        for r in ("requests", "limits"):
            worker["containers"][0]["resources"][r]["nvidia.com/gpu"] = "8"
    elif breakage == "pip_runtime_env":
        doc["spec"]["runtimeEnvYAML"] += "pip: [torch]\n"
    elif breakage == "no_deadline":
        del doc["spec"]["activeDeadlineSeconds"]
    elif breakage == "version_mismatch":
        spec["rayVersion"] = "2.9.0"
    else:
        worker["volumes"] = []
    if by_schema:
        assert crd_errors(doc) != []
    else:
        assert crd_errors(doc) == [] and kuberay_problems(doc) != []


# -----------------------------------------------------------------------------
# Monitoring: the Grafana dashboard

SERVE_METRICS = ("nanochat_serve_ttft_seconds", "nanochat_serve_tpot_seconds", "nanochat_serve_output_tokens_total",
                 "nanochat_serve_running_requests", "nanochat_serve_waiting_requests", "nanochat_serve_batch_occupancy",
                 "nanochat_serve_kv_cache_usage", "nanochat_serve_prefix_cache_hit_tokens_total")  # fmt: skip
ANNOUNCED_TRAIN = ("nanochat_train_steps_lost",)  # set by the preemption work (restarts): a panel waits for it


def dashboard_exprs() -> list[str]:
    dash = json.loads((CLUSTER / "monitoring" / "nanochat-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_covers_the_custom_metrics_with_valid_promql(tmp_path):
    from ray_jobs.train_common import EVAL_GAUGES, GAUGES

    exprs = dashboard_exprs()
    used = {m for e in exprs for m in re.findall(r"\bray_(nanochat_\w+?)(?:_bucket)?\b", e)}
    wanted = set(GAUGES) | set(EVAL_GAUGES) | set(SERVE_METRICS)
    assert wanted <= used, wanted - used  # every training gauge and serving metric has a panel
    assert used <= wanted | set(ANNOUNCED_TRAIN), used - wanted  # and no panel queries a metric nobody exports
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `bash install.sh --test` (Debian's prometheus package)")
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"nanochat:panel_{i}", "expr": e.replace("$run", ".*")}
                                                         for i, e in enumerate(exprs)]}]}  # fmt: skip
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"SUCCESS: {len(exprs)} rules found" in out.stdout, out.stdout + out.stderr
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(x[1m])"}]}]})
    )
    assert subprocess.run([promtool, "check", "rules", str(path)], capture_output=True).returncode != 0
    subprocess.run(["bash", "-n", str(CLUSTER / "monitoring" / "start-monitoring.sh")], check=True)


# -----------------------------------------------------------------------------
# cluster/local_cluster.py: the local stand-in keeps the config's node types and head start command


def test_local_cluster_derives_from_the_real_node_types():
    sys.path.insert(0, str(CLUSTER))
    try:
        import local_cluster
    finally:
        sys.path.remove(str(CLUSTER))
    config = load(CLUSTER / "aws-gpu.yaml")
    derived = local_cluster.derive_config(config, cpus_per_node=2, idle_timeout_s=8, gcs_address="127.0.0.1:1")
    ray_up_check(derived)  # what the head's autoscaler will load
    head = derived["available_node_types"][local_cluster.FAKE_HEAD_TYPE]
    assert head["resources"] == config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    workers = {n: t for n, t in derived["available_node_types"].items() if n != local_cluster.FAKE_HEAD_TYPE}
    assert set(workers) == {"gpu_8x_h100"}
    for name, t in workers.items():
        real = config["available_node_types"][name]
        assert (t["min_workers"], t["max_workers"]) == (real["min_workers"], real["max_workers"])
        assert t["resources"] == {"CPU": 2}
    assert derived["max_workers"] == config["max_workers"] and derived["idle_timeout_minutes"] * 60 == 8
    flags = local_cluster.head_start_flags(config)  # the YAML's own flags, minus ports and local files
    assert flags == []  # aws-gpu.yaml sets only flags that name ports/files/hosts, which the local run replaces
    config["head_start_ray_commands"][1] += " --object-store-memory=1000000000"
    assert local_cluster.head_start_flags(config) == ["--object-store-memory=1000000000"]
