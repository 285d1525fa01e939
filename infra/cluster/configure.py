"""Write `ray up` files for one AWS region, ready to use, from infra/cluster/aws-*.yaml.

    python infra/cluster/configure.py --region eu-west-1            # -> runs/cluster/aws-{gpu,cpu}.yaml
    ray up runs/cluster/aws-gpu.yaml

What depends on the region is filled in here, so that nothing is guessed by hand:

- the machine image: AWS's "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04)", looked
  up in the region through its public SSM parameter (NVIDIA driver 595 in the 2026 releases;
  the CUDA 13 build of torch needs 580 or newer), or given with --ami;
- the region, and the zones: all of the region's (Ray launches into any usable subnet) unless
  --zones names some;
- the registry login: for an ECR image (infra/IMAGE), every node logs in to that registry before
  it pulls, with its instance profile (infra/cluster/iam/).

Needs boto3 and AWS credentials only for the SSM look-up (not with --ami).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
IMAGE_FILE = HERE.parent / "IMAGE"
TEMPLATES = ("aws-gpu.yaml", "aws-cpu.yaml")
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
ECR_HOST = re.compile(r"^(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com$")


def lookup_ami(region: str) -> str:
    import boto3

    return boto3.client("ssm", region_name=region).get_parameter(Name=DLAMI_PARAMETER)["Parameter"]["Value"]


def registry_login(image: str) -> list[str]:
    """The host commands that let docker pull ``image``: an ECR login, or nothing (public image)."""
    host = image.split("/", 1)[0]
    match = ECR_HOST.match(host)
    if not match:
        return []
    return [f"aws ecr get-login-password --region {match.group(2)} | docker login --username AWS "
            f"--password-stdin {host}"]


def configure(template: dict, region: str, ami: str, image: str, zones: str | None) -> dict:
    config = dict(template)
    config["provider"] = {**template["provider"], "region": region}
    config["provider"].pop("availability_zone", None)
    if zones:
        config["provider"]["availability_zone"] = zones
    config["docker"] = {**template["docker"], "image": image}
    config["available_node_types"] = {
        name: {**node, "node_config": {**node["node_config"], "ImageId": ami}}
        for name, node in template["available_node_types"].items()}
    config["initialization_commands"] = registry_login(image)
    config["setup_commands"] = [command.replace("AWS_REGION=us-west-2", f"AWS_REGION={region}")
                                for command in template["setup_commands"]]
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--region", required=True, help="AWS region, e.g. us-west-2")
    parser.add_argument("--ami", help="machine image id (default: the region's current DLAMI base GPU image)")
    parser.add_argument("--zones", help="comma-separated availability zones (default: every zone of the region)")
    parser.add_argument("--out", default="runs/cluster", help="folder for the ready files (default runs/cluster)")
    args = parser.parse_args(argv)
    ami = args.ami or lookup_ami(args.region)
    image = IMAGE_FILE.read_text().strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in TEMPLATES:
        template = yaml.safe_load((HERE / name).read_text())
        (out / name).write_text(f"# Written by infra/cluster/configure.py from infra/cluster/{name} for "
                                f"{args.region}, image {ami}.\n"
                                + yaml.safe_dump(configure(template, args.region, ami, image, args.zones),
                                                 sort_keys=False))
    sys.stdout.write(f"{', '.join(str(out / n) for n in TEMPLATES)}: region {args.region}, machine image {ami}, "
                     f"project image {image}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
