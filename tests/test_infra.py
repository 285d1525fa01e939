"""infra/ stays consistent with the pins and the jobs, checked statically (no Ray, no Docker).

The CI machines can neither pull images nor reach a Kubernetes or AWS API, so the Dockerfile,
the `ray up` files, the KubeRay manifests and the MLflow stack are checked here for what can
be checked without running them: every YAML parses; the Ray version of the base image, the
image tag, the cluster files and the KubeRay manifests is the one pinned in pyproject.toml and
requirements/lock.txt, on Python 3.11; one image name everywhere; the `ray up` files pass
Ray 2.60's own cluster-config schema; the KubeRay objects use only fields of the RayJob /
RayCluster API; every `upsr` command they run parses with that job's own argument parser and
its config (file and --set overrides) loads. tests/test_cluster.py runs the jobs for real.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
IMAGE_IN_CONTAINER = "/home/ray/upsr/"
# The one place the image is named (infra/set_image.py renames it everywhere); any tag of its
# repository counts as a mention.
IMAGE = (INFRA / "IMAGE").read_text().strip()
IMAGE_PATTERN = re.compile(re.escape(IMAGE.rsplit(":", 1)[0]) + r":[\w.-]+")
# Fields of the KubeRay v1 API (ray-operator/apis/ray/v1: RayJobSpec, RayClusterSpec,
# HeadGroupSpec, WorkerGroupSpec); a misspelt field would be dropped silently by the API server.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                   "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions",
                   "upgradeStrategy"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress", "suspend"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "numOfHosts",
                "idleTimeoutSeconds", "scaleStrategy", "suspend"}


def pinned(name: str) -> str:
    versions = set(re.findall(rf"^{name}==([\w.]+)$", (REPO / "requirements" / "lock.txt").read_text(), re.MULTILINE))
    versions |= set(re.findall(rf'"{name}(?:\[[^\]]*\])?==([\w.]+)"', (REPO / "pyproject.toml").read_text()))
    assert len(versions) == 1, f"{name}: pins disagree or are missing: {versions}"
    return versions.pop()


RAY = pinned("ray")
MLFLOW = pinned("mlflow")


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kube_objects(kind: str) -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted((INFRA / "k8s").glob("*.yaml")) for doc in documents(path)
            if doc.get("kind") == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"{path.name} RayCluster", doc["spec"]) for path, doc in kube_objects("RayCluster")]
    specs += [(f"{path.name} RayJob", doc["spec"]["rayClusterSpec"]) for path, doc in kube_objects("RayJob")]
    return specs


def pod_containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def upsr_commands(entrypoint: str) -> list[list[str]]:
    """Each ``upsr ...`` command of a shell entrypoint (commands chained with &&)."""
    commands = [shlex.split(part) for part in entrypoint.split("&&")]
    assert all(command and command[0] == "upsr" for command in commands), entrypoint
    return commands


def test_every_yaml_under_infra_parses():
    files = yaml_files()
    names = {str(p.relative_to(INFRA)) for p in files}
    assert {"cluster/aws-gpu.yaml", "cluster/aws-cpu.yaml", "k8s/raycluster.yaml", "k8s/rayjob-synth.yaml",
            "k8s/rayjob-train.yaml", "k8s/rayjob-tune.yaml", "mlflow/compose.yaml"} <= names
    for path in files:
        assert documents(path), f"{path} is empty"


def test_the_pins_agree():
    assert RAY == "2.60.0" and re.fullmatch(r"\d+\.\d+\.\d+", MLFLOW)
    assert 'requires-python = "==3.11.*"' in (REPO / "pyproject.toml").read_text()


def test_dockerfile_builds_on_the_pinned_ray_gpu_image_and_installs_the_lock():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE) == [f"rayproject/ray:{RAY}-py311-gpu"]
    assert "requirements/lock.txt" in text and "PIP_BUILD_CONSTRAINT" in text
    # Only what runs: pyproject's dependencies with the lock as constraints, never the whole lock
    # (which holds the dev tools), and one OpenCV, the headless build.
    assert "pip install -c requirements/lock.txt -r /tmp/runtime.txt" in text
    assert not re.search(r"-r requirements/lock\.txt", text)
    assert "pip uninstall -y opencv-python" in text and "--force-reinstall -c requirements/lock.txt " \
        "opencv-python-headless" in text
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {re.split(r"[\[=<>! ]", requirement)[0].lower() for requirement in project["dependencies"]}
    dev = {re.split(r"[\[=<>! ]", requirement)[0].lower() for requirement in project["optional-dependencies"]["dev"]}
    assert {"pytest", "moto"} <= dev and not runtime & (dev | {"cfn-lint", "pytest", "moto"})
    assert "python infra/docker/smoke.py" in text
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", ".git", "infra", "!infra/docker/smoke.py"} <= set(ignored)
    assert ignored.index("!infra/docker/smoke.py") > ignored.index("infra")


def test_the_images_smoke_test_passes_here():
    """infra/docker/smoke.py, as the image build runs it: imports and one degradation."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(INFRA / "docker" / "smoke.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"smoke: ray {RAY}, OpenCV ") and "degradation 64x64 -> 16x16" in done.stdout


def image_references() -> dict[str, set[str]]:
    """Every mention of the project image in infra/ and docs/, by file."""
    found = {}
    for path in [*INFRA.rglob("*"), *(REPO / "docs").glob("*.md")]:
        if path.is_file() and path.suffix in (".yaml", ".md", "") and path.name != "Dockerfile.dockerignore":
            images = set(IMAGE_PATTERN.findall(path.read_text()))
            if images:
                found[str(path.relative_to(REPO))] = images
    return found


def test_one_image_name_everywhere_tagged_with_the_pinned_ray_and_python():
    references = image_references()
    images = set().union(*references.values())
    assert images == {IMAGE}, references
    image = images.pop()
    assert image.endswith(f"-ray{RAY}-py311-gpu"), image
    for path in ("infra/cluster/aws-gpu.yaml", "infra/cluster/aws-cpu.yaml", "infra/docker/README.md",
                 "docs/cluster.md", *(f"infra/k8s/{p.name}" for p in (INFRA / "k8s").glob("rayc*.yaml")),
                 *(f"infra/k8s/{p.name}" for p in (INFRA / "k8s").glob("rayjob-*.yaml"))):
        assert path in references, f"{path} does not name the image"
    # Structurally too: the image is what every node and every pod runs.
    for name in ("aws-gpu.yaml", "aws-cpu.yaml"):
        assert documents(INFRA / "cluster" / name)[0]["docker"]["image"] == image
    for where, spec in cluster_specs():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert [c["image"] for c in pod_containers(group)] == [image], where


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "aws-cpu.yaml"])
def test_ray_up_files_pass_rays_cluster_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = documents(INFRA / "cluster" / name)[0]
    validate_config(prepare_config(copy.deepcopy(config)))
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert not re.match(r"[gp]\d", head["node_config"]["InstanceType"])
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    gpu_workers = [k for k, v in workers.items() if re.match(r"[gp]\d", v["node_config"]["InstanceType"])]
    assert gpu_workers if name == "aws-gpu.yaml" else not gpu_workers
    assert all(v["min_workers"] == 0 and v["max_workers"] > 0 for v in workers.values())
    assert config["setup_commands"] and config["file_mounts"]["~/.ray/auth_token"]
    assert "RAY_AUTH_MODE=token" in " ".join(config["setup_commands"])
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in command for command in commands)


def test_configure_writes_ray_up_files_for_a_region_with_its_image_and_registry_login(tmp_path, monkeypatch):
    import importlib.util

    from ray.autoscaler._private.util import prepare_config, validate_config

    spec = importlib.util.spec_from_file_location("configure", INFRA / "cluster" / "configure.py")
    configure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(configure)
    ecr = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/ml/upsr-ray:0.1.0-ray2.60.0-py311-gpu"
    monkeypatch.setattr(configure, "IMAGE_FILE", tmp_path / "IMAGE")
    (tmp_path / "IMAGE").write_text(ecr + "\n")
    assert configure.main(["--region", "eu-west-1", "--ami", "ami-0abc", "--out", str(tmp_path / "out")]) == 0
    for name in ("aws-gpu.yaml", "aws-cpu.yaml"):
        config = documents(tmp_path / "out" / name)[0]
        validate_config(prepare_config(copy.deepcopy(config)))
        assert config["provider"]["region"] == "eu-west-1" and "availability_zone" not in config["provider"]
        assert {node["node_config"]["ImageId"] for node in config["available_node_types"].values()} == {"ami-0abc"}
        assert config["docker"]["image"] == ecr
        assert config["initialization_commands"] == [
            "aws ecr get-login-password --region eu-west-1 | docker login --username AWS --password-stdin "
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com"]
        assert "export AWS_REGION=eu-west-1" in " ".join(config["setup_commands"])
        # Each node type gets the instance profile whose policy infra/cluster/iam/ holds.
        profiles = {node["node_config"]["IamInstanceProfile"]["Name"] for node in config["available_node_types"].values()}
        assert profiles == {"upsr-ray-head", "upsr-ray-worker"}
    public = configure.configure(documents(INFRA / "cluster" / "aws-gpu.yaml")[0], "us-east-1", "ami-1",
                                 "ghcr.io/me/upsr-ray:0.1.0-ray2.60.0-py311-gpu", "us-east-1a")
    assert public["initialization_commands"] == [] and public["provider"]["availability_zone"] == "us-east-1a"
    # The templates in the repository name no image id a region could have, and mount nothing unused.
    for name in ("aws-gpu.yaml", "aws-cpu.yaml"):
        template = documents(INFRA / "cluster" / name)[0]
        assert list(template["file_mounts"]) == ["~/.ray/auth_token"]
        assert {n["node_config"]["ImageId"] for n in template["available_node_types"].values()} == {
            "set-by-infra/cluster/configure.py"}


def test_iam_documents_parse_and_the_head_may_launch_workers_and_pass_their_role():
    import json

    iam = INFRA / "cluster" / "iam"
    documents_by_name = {path.stem: json.loads(path.read_text()) for path in iam.glob("*.json")}
    assert set(documents_by_name) == {"trust-ec2", "head-policy", "worker-policy"}
    for document in documents_by_name.values():
        assert document["Version"] == "2012-10-17" and document["Statement"]
    actions = {name: {a for s in doc["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str)
                                                             else s["Action"])}
               for name, doc in documents_by_name.items()}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances",
            "iam:PassRole"} <= actions["head-policy"]
    assert not any(a.startswith(("ec2:", "iam:")) for a in actions["worker-policy"])
    for name in ("head-policy", "worker-policy"):
        assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "ecr:BatchGetImage"} <= actions[name]


def test_set_image_renames_the_image_everywhere(tmp_path, monkeypatch):
    import importlib.util
    import shutil

    shutil.copytree(INFRA, tmp_path / "infra")
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    spec = importlib.util.spec_from_file_location("set_image", INFRA / "set_image.py")
    set_image = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(set_image)
    monkeypatch.setattr(set_image, "REPO", tmp_path)
    monkeypatch.setattr(set_image, "IMAGE_FILE", tmp_path / "infra" / "IMAGE")
    new = "123456789012.dkr.ecr.us-west-2.amazonaws.com/ml/upsr-ray:0.1.0-ray2.60.0-py311-gpu"
    before = set_image.files_naming(IMAGE)
    assert len(before) >= 5
    assert set_image.main([new]) == 0
    assert (tmp_path / "infra" / "IMAGE").read_text().strip() == new
    assert set_image.files_naming(IMAGE) == [] and set_image.files_naming(new) == before
    assert set_image.main(["no-tag"]) == 2


def quantity(value) -> float:
    """A Kubernetes CPU or memory quantity in CPUs or GiB."""
    text = str(value)
    units = {"Gi": 1.0, "Mi": 1 / 1024, "m": 1e-3}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * scale
    return float(text)


def documented_node_sizes() -> dict[str, dict]:
    """The node-size table of docs/cluster.md: group -> vCPU, memory and GPUs of its node type."""
    rows = re.findall(r"^\| (\w+) \| ([\w.]+) \| (\d+) \| (\d+) \| (\d+) \| [^|]+ \| (\d+) \|$",
                      (REPO / "docs" / "cluster.md").read_text(), re.MULTILINE)
    return {group: {"node": node, "cpu": int(cpu), "memory": int(memory), "gpu": int(gpu), "pods": int(pods)}
            for group, node, cpu, memory, gpu, pods in rows}


def test_every_ray_pod_fits_its_documented_node_type_and_runs_as_the_project():
    sizes = documented_node_sizes()
    assert set(sizes) == {"head", "gpu", "cpu"}, sizes
    for where, spec in cluster_specs():
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for name, group in groups:
            pod = group["template"]["spec"]
            requests = pod_containers(group)[0]["resources"]["requests"]
            node = sizes[name]
            # What the pods of one node request stays below the node's size (allocatable is less
            # than the size by the kubelet's reserve: about 0.1 CPU and 2-3 GiB on these).
            assert node["pods"] * quantity(requests["cpu"]) <= node["cpu"] - 0.5, (where, name)
            assert node["pods"] * quantity(requests["memory"]) <= node["memory"] - 3, (where, name)
            assert node["pods"] * int(requests.get("nvidia.com/gpu", 0)) <= node["gpu"], (where, name)
            assert pod["serviceAccountName"] == "upsr-ray" and pod["imagePullSecrets"] == [{"name": "upsr-registry"}]
            shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
            assert shm and shm[0]["emptyDir"]["medium"] == "Memory", (where, name)
            assert {"name": "dshm", "mountPath": "/dev/shm"} in pod_containers(group)[0]["volumeMounts"]
    for path, job in kube_objects("RayJob"):
        assert job["spec"]["submissionMode"] == "SidecarMode", path.name
    accounts = {doc["metadata"]["name"] for _, doc in kube_objects("ServiceAccount")}
    assert "upsr-ray" in accounts


def test_the_mlflow_deployment_is_the_server_the_settings_name():
    settings = next(doc for _, doc in kube_objects("ConfigMap") if doc["metadata"]["name"] == "upsr-settings")
    url = settings["data"]["MLFLOW_TRACKING_URI"]
    manifests = documents(INFRA / "k8s" / "mlflow" / "mlflow.yaml")
    service = next(doc for doc in manifests if doc["kind"] == "Service")
    deployment = next(doc for doc in manifests if doc["kind"] == "Deployment")
    assert url == f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:" \
                  f"{service['spec']['ports'][0]['port']}"
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["mlflow", "server"] and "--serve-artifacts" in command
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    assert url.split("//", 1)[1] in allowed
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "MLFLOW_BACKEND_STORE_URI", "valueFrom": {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}} in env
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith(f":{MLFLOW}")


def test_kuberay_manifests_use_the_api_pin_ray_and_enable_token_auth():
    assert kube_objects("RayCluster") and len(kube_objects("RayJob")) == 3
    for where, spec in cluster_specs():
        assert set(spec) <= RAYCLUSTER_SPEC, (where, set(spec) - RAYCLUSTER_SPEC)
        assert spec["rayVersion"] == RAY, where
        assert spec["authOptions"] == {"mode": "token"}, where
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP, where
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", where
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_GROUP, (where, set(group) - WORKER_GROUP)
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for container in pod_containers(group):
                sources = [next(iter(s.values()))["name"] for s in container["envFrom"]]
                assert sources == ["upsr-settings", "upsr-aws"], where
                assert "env" not in container or not any("SECRET" in e["name"] for e in container["env"]), where
    gpu_groups = {where: [g["groupName"] for g in spec["workerGroupSpecs"]
                          if pod_containers(g)[0]["resources"]["limits"].get("nvidia.com/gpu")]
                  for where, spec in cluster_specs()}
    assert gpu_groups["raycluster.yaml RayCluster"] and gpu_groups["rayjob-train.yaml RayJob"]
    assert gpu_groups["rayjob-tune.yaml RayJob"] and not gpu_groups["rayjob-synth.yaml RayJob"]
    settings = documents(INFRA / "k8s" / "settings.yaml")[0]
    assert settings["kind"] == "ConfigMap" and settings["metadata"]["name"] == "upsr-settings"
    assert not any(re.search("KEY|SECRET|TOKEN|PASSWORD", key) for key in settings["data"])


def test_rayjobs_run_existing_upsr_jobs_whose_arguments_and_configs_load():
    from cli import config as root_config
    from cli.main import JOBS, build_parser

    jobs_seen = set()
    for path, doc in kube_objects("RayJob"):
        spec = doc["spec"]
        assert set(spec) <= RAYJOB_SPEC, (path.name, set(spec) - RAYJOB_SPEC)
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, path.name
        assert "runtimeEnvYAML" not in spec or not re.search("KEY|SECRET|TOKEN|PASSWORD", spec["runtimeEnvYAML"])
        for command in upsr_commands(spec["entrypoint"]):
            job = command[1]
            assert job in JOBS, f"{path.name}: `upsr {job}` is not a job of cli.main.JOBS"
            try:
                args = build_parser(job).parse_args(command[1:])
            except SystemExit:
                pytest.fail(f"{path.name}: `{shlex.join(command)}` does not parse")
            for config_path in args.config:
                assert config_path.startswith(IMAGE_IN_CONTAINER), path.name
                config_file = REPO / config_path[len(IMAGE_IN_CONTAINER):]
                assert config_file.is_file(), f"{path.name}: {config_path} is not in the image (no {config_file})"
                config = root_config.load(config_file, args.set)
            for uri in (getattr(args, "data", None), getattr(args, "output", None), getattr(args, "aux", None)):
                assert uri is None or uri.startswith("s3://"), (path.name, uri)
            for section in ("train", "aux_train"):
                storage = getattr(config, section).storage_path
                if job.replace("-", "_") == section or (job == "tune" and section == "train"):
                    assert storage and storage.startswith("s3://"), (path.name, section)
            jobs_seen.add(job)
    assert {"synth", "train-aux", "train", "tune"} <= jobs_seen


def test_the_train_rayjob_hands_train_the_checkpoint_train_aux_writes():
    from pipelines import config as config_module

    (path, doc), = [(p, d) for p, d in kube_objects("RayJob") if p.name == "rayjob-train.yaml"]
    aux, train = upsr_commands(doc["spec"]["entrypoint"])
    assert aux[1] == "train-aux" and train[1] == "train"
    options = dict(zip(aux[2::2], aux[3::2]))
    config = config_module.load(REPO / options["--config"][len(IMAGE_IN_CONTAINER):],
                                [v for k, v in zip(aux[2::2], aux[3::2]) if k == "--set"])
    expected = f"{config.aux_train.storage_path}/{options['--name']}/checkpoint_{config.aux_train.steps:08d}"
    assert train[train.index("--aux") + 1] == expected


def test_mlflow_stack_proxies_artifacts_to_s3_with_postgres_and_the_pinned_mlflow():
    compose = documents(INFRA / "mlflow" / "compose.yaml")[0]
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    assert f'"mlflow=={MLFLOW}"' in (INFRA / "mlflow" / "Dockerfile").read_text()
    server = services["mlflow"]
    command = server["command"]
    assert command[:2] == ["mlflow", "server"] and "--serve-artifacts" in command
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    assert command[command.index("--workers") + 1]
    assert server["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    # Passwords come from .env (git-ignored), never from the compose file itself.
    for service in services.values():
        for key, value in (service.get("environment") or {}).items():
            if re.search("PASSWORD|SECRET", key):
                assert str(value).startswith("${"), (key, value)
    assert ".env" in (INFRA / "mlflow" / ".gitignore").read_text().split()


def test_docs_call_only_existing_jobs():
    from cli.main import JOBS

    for name in ("cluster.md", "operations.md"):
        text = (REPO / "docs" / name).read_text()
        # Code only: fenced blocks and inline spans.
        code = "\n".join(re.findall(r"```.*?```", text, re.DOTALL) + re.findall(r"`[^`\n]+`", text))
        called = set(re.findall(r"(?<![\w/.-])upsr ([a-z][\w-]*)", code))
        assert called, name
        assert called <= set(JOBS), (name, called - set(JOBS))
