"""A cluster-shaped stack on this machine, bound to 127.0.0.1: a Ray head, an MLflow tracking
server and an S3 endpoint. The jobs are submitted to it exactly as to a real cluster.

    eval "$(bash infra/local/stack.sh start)"     # starts, prints `export ...` lines
    ray job submit --working-dir . -- upsr synth --output s3://upsr/data --config configs/tiny.yaml
    bash infra/local/stack.sh stop                 # stops what start started, nothing else

What ``start`` starts, each in its own session (process group), on free ports:

- ``moto_server``: a local S3 endpoint; the bucket (``--bucket``, default ``upsr``) is created.
- ``mlflow server``: SQLite backend in the state folder, artifacts proxied to
  ``s3://<bucket>/mlflow`` (``--serve-artifacts``), one worker (the default of several costs
  ~3 GB of memory for nothing here).
- ``ray start --head --block``: its own ``--temp-dir`` and ports, so it never meets another Ray
  instance on this machine; dashboard (the job-submission API) on 127.0.0.1.

Ray 2.60 authentication: the head runs with ``RAY_AUTH_MODE=token`` and a token generated
into the state folder (``ray_auth_token``, mode 0600), read through ``RAY_AUTH_TOKEN_PATH`` by
the head, its workers and every client (``ray job submit``). ``--auth disabled`` runs without,
as Ray did before 2.52 (loopback only; never on a cluster).

Credentials: the standard AWS variables of the shell that runs ``start`` go, through their
process environment, to the Ray head (so to every job driver and worker), MLflow server and
moto; they are never written to the state folder, printed, or put into a job's runtime_env.

``stop`` ends exactly what ``start`` started: each recorded process group, then every process
whose environment carries this stack's id (``UPSR_STACK_ID``): Ray's workers and job drivers
run in sessions of their own, but inherit the head's environment. Nothing is matched by name.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger("upsr.stack")

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DEFAULT_STATE_DIR = REPO / "runs" / "stack"
STATE_FILE = "state.json"
ENV_FILE = "env.sh"
TOKEN_FILE = "ray_auth_token"
MARKER = "UPSR_STACK_ID"
REGION_DEFAULT = "us-east-1"
# Variables a started service must not inherit from the shell that starts it: they would point
# it at another Ray instance or override the stack's token.
NOT_INHERITED = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_JOB_CONFIG_JSON_ENV_VAR",
                 "MLFLOW_TRACKING_URI")


class StackError(Exception):
    """Something the user can fix; reported without a traceback."""


def free_ports(count: int) -> list[int]:
    """Distinct free ports (held open together, so the kernel does not hand out one twice)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_until(check, what: str, timeout: float, process: subprocess.Popen | None = None, log_file: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (OSError, urllib.error.URLError):
            pass
        if process is not None and process.poll() is not None:
            raise StackError(f"{what} exited with code {process.returncode}; see {log_file}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not come up within {timeout:.0f} s; see {log_file}")
        time.sleep(0.3)


def http_ok(url: str, token: str | None = None) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status == 200


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


# --- processes -----------------------------------------------------------------------------


def marked_pids(stack_id: str) -> list[int]:
    """Processes whose environment carries this stack's id (this user's readable processes)."""
    needle = f"{MARKER}={stack_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return sorted(found)


def is_ours(pid: int, stack_id: str) -> bool:
    """The pid is alive and still one of ours (not a recycled pid)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and f"{MARKER}={stack_id}".encode() in environ.split(b"\0")


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def session_id(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def kill_session(leader: int, stack_id: str) -> None:
    """SIGKILL what is left of one service's session (its processes carry the stack's id)."""
    for pid in marked_pids(stack_id):
        if session_id(pid) == leader:
            signal_pid(pid, signal.SIGKILL)
    wait_gone([pid for pid in marked_pids(stack_id) if session_id(pid) == leader], stack_id, 10)


def wait_gone(pids: list[int], stack_id: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if is_ours(pid, stack_id)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def spawn(command: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen:
    """Start a service in a session of its own (its pid is its process group id)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as output:
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO)


# --- start / stop --------------------------------------------------------------------------


def read_state(state_dir: Path) -> dict | None:
    path = state_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def running(state: dict | None) -> list[str]:
    if not state:
        return []
    return [name for name, pid in state["pids"].items() if is_ours(pid, state["stack_id"])]


def start(args: argparse.Namespace) -> dict:
    state_dir = Path(args.state_dir).resolve()
    previous = read_state(state_dir)
    if running(previous):
        raise StackError(f"a stack is already running from {state_dir} ({', '.join(running(previous))}); "
                         f"stop it first: bash infra/local/stack.sh stop --state-dir {state_dir}")
    missing = [name for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(name)]
    if missing:
        raise StackError(f"{' and '.join(missing)} not set: the stack takes S3 credentials from the standard AWS "
                         f"environment (any values work with the local endpoint, e.g. "
                         f"export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local-secret)")
    state_dir.mkdir(parents=True, exist_ok=True)
    for stale in (STATE_FILE, ENV_FILE, TOKEN_FILE):
        (state_dir / stale).unlink(missing_ok=True)
    logs = state_dir / "logs"
    stack_id = secrets.token_hex(8)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or REGION_DEFAULT
    # Ray's unix sockets live under its temp dir, whose path must stay short (sun_path: 107 bytes).
    ray_temp = tempfile.mkdtemp(prefix="upsr-ray-", dir="/tmp")
    base_env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    base_env |= {MARKER: stack_id, "AWS_REGION": region, "RAY_USAGE_STATS_ENABLED": "0",
                 "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    state = {"stack_id": stack_id, "state_dir": str(state_dir), "ray_temp_dir": ray_temp, "pids": {},
             "ports": {}, "bucket": args.bucket, "auth": args.auth, "env": {}}

    def save() -> None:
        path = state_dir / STATE_FILE
        path.write_text(json.dumps(state, indent=2) + "\n")

    try:
        # The three services start together; each is waited for before it is first needed.
        # All ports at once: services bind them later, so separate calls could hand one out twice.
        s3_port, mlflow_port, *head_ports = free_ports(11)
        endpoint = f"http://127.0.0.1:{s3_port}"
        tracking_uri = f"http://127.0.0.1:{mlflow_port}"
        moto = spawn([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], base_env,
                     logs / "moto.log")
        state["pids"]["moto"] = moto.pid
        state["ports"]["s3"] = s3_port
        save()

        # MLflow job execution (GenAI scorers, prompt optimisation) is not used by the jobs: off,
        # it saves seven worker processes.
        mlflow_env = base_env | {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint,
                                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        server = spawn([str(VENV_BIN / "mlflow"), "server",
                        "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
                        "--artifacts-destination", f"s3://{args.bucket}/mlflow", "--serve-artifacts",
                        "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", str(args.mlflow_workers)],
                       mlflow_env, logs / "mlflow.log")
        state["pids"]["mlflow"] = server.pid
        state["ports"]["mlflow"] = mlflow_port
        save()

        token_path = state_dir / TOKEN_FILE
        ray_env = base_env | {"MLFLOW_TRACKING_URI": tracking_uri, "AWS_ENDPOINT_URL_S3": endpoint,
                              "RAY_AUTH_MODE": args.auth}
        token = None
        if args.auth == "token":
            token = secrets.token_hex(32)
            descriptor = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(token)
            ray_env["RAY_AUTH_TOKEN_PATH"] = str(token_path)

        def start_head(ports: list[int]) -> subprocess.Popen:
            gcs, dashboard, client, node_manager, object_manager, agent_listen, agent_grpc, metrics, agent = ports
            command = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
                       "--node-ip-address", "127.0.0.1", "--temp-dir", ray_temp, "--port", str(gcs),
                       "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                       "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
                       "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
                       "--dashboard-agent-listen-port", str(agent_listen), "--dashboard-agent-grpc-port", str(agent_grpc),
                       "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(agent),
                       "--object-store-memory", str(args.object_store_mb * 1024 * 1024)]
            if args.num_cpus is not None:
                command += ["--num-cpus", str(args.num_cpus)]
            if args.num_gpus is not None:
                command += ["--num-gpus", str(args.num_gpus)]
            # RAY_ADDRESS as KubeRay sets it in its pods: Ray's own actors (Ray Train's placement
            # group cleaner, the state API) look the cluster up with it; without it they scan this
            # machine's processes and find other Ray instances too.
            process = spawn(command, ray_env | {"RAY_ADDRESS": f"127.0.0.1:{gcs}"}, logs / "ray-head.log")
            state["pids"]["ray_head"] = process.pid
            state["ports"] |= {"ray_gcs": gcs, "ray_dashboard": dashboard}
            save()
            return process

        head = start_head(head_ports)

        wait_until(lambda: port_open(s3_port), "moto_server", 60, moto, logs / "moto.log")
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name=region).create_bucket(Bucket=args.bucket)
        log.info("S3 endpoint %s with bucket %s", endpoint, args.bucket)
        wait_until(lambda: http_ok(f"{tracking_uri}/health"), "mlflow server", 300, server, logs / "mlflow.log")
        log.info("MLflow tracking server %s (artifacts: s3://%s/mlflow)", tracking_uri, args.bucket)
        for attempt in (1, 2):
            dashboard_url = f"http://127.0.0.1:{state['ports']['ray_dashboard']}"
            try:
                # The job API answers once the head's job agent is up, which comes after the dashboard.
                wait_until(lambda: http_ok(f"{dashboard_url}/api/jobs/", token), "ray head (job API)", 300, head,
                           logs / "ray-head.log")
                break
            except StackError:
                # `ray start` gives its raylet a fixed 30 s to register, which a saturated machine
                # can miss: one more try, on fresh ports, after clearing what the first one left.
                if attempt == 2 or head.poll() is None:
                    raise
                log.warning("the Ray head did not start (see %s); trying once more", logs / "ray-head.log")
                kill_session(head.pid, stack_id)
                head = start_head(free_ports(9))
        gcs = state["ports"]["ray_gcs"]
        log.info("Ray head at 127.0.0.1:%d, job API %s (auth: %s)", gcs, dashboard_url, args.auth)
    except BaseException:
        stop_state(state)
        raise

    env = {"RAY_API_SERVER_ADDRESS": dashboard_url, "RAY_ADDRESS": f"127.0.0.1:{gcs}", "RAY_AUTH_MODE": args.auth,
           "MLFLOW_TRACKING_URI": tracking_uri, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_REGION": region,
           "UPSR_BUCKET": args.bucket}
    if args.auth == "token":
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    state["env"] = env
    save()
    (state_dir / ENV_FILE).write_text(env_lines(state))
    return state


def env_lines(state: dict) -> str:
    lines = [f"# UPSR local stack {state['stack_id']} (state: {state['state_dir']})",
             # A token in RAY_AUTH_TOKEN would win over RAY_AUTH_TOKEN_PATH.
             "unset RAY_AUTH_TOKEN"]
    lines += [f"export {key}={value}" for key, value in state["env"].items()]
    return "\n".join(lines) + "\n"


def stop_state(state: dict, timeout: float = 20.0) -> list[int]:
    """Stop the recorded services, then any leftover process of this stack; returns survivors."""
    stack_id = state["stack_id"]
    # Ray first (its jobs may still talk to MLflow and S3), then MLflow, then S3.
    for name in ("ray_head", "mlflow", "moto"):
        pid = state["pids"].get(name)
        if pid is None or not is_ours(pid, stack_id):
            continue
        # `ray start --block` shuts its node down on SIGTERM; the others exit on it too.
        signal_pid(pid, signal.SIGTERM)
        if wait_gone([pid], stack_id, timeout) and is_ours(pid, stack_id):
            signal_group(pid, signal.SIGKILL)
        log.info("stopped %s (pid %d)", name, pid)
    leftovers = marked_pids(stack_id)
    for pid in leftovers:
        signal_pid(pid, signal.SIGTERM)
    survivors = wait_gone(leftovers, stack_id, timeout)
    for pid in survivors:
        signal_pid(pid, signal.SIGKILL)
    survivors = wait_gone(marked_pids(stack_id), stack_id, 10)
    if leftovers:
        log.info("stopped %d leftover process(es) of the stack (Ray workers, job drivers)", len(leftovers))
    if state.get("ray_temp_dir"):
        shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)
    return survivors


def stop(args: argparse.Namespace) -> None:
    state_dir = Path(args.state_dir).resolve()
    state = read_state(state_dir)
    if state is None:
        log.info("no stack state under %s: nothing to stop", state_dir)
        return
    survivors = stop_state(state)
    if survivors:
        raise StackError(f"processes {survivors} of the stack survived SIGKILL")
    (state_dir / STATE_FILE).rename(state_dir / "state.stopped.json")
    for name in (ENV_FILE, TOKEN_FILE):
        (state_dir / name).unlink(missing_ok=True)
    log.info("stack %s stopped", state["stack_id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/local/stack.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, summary in (("start", "start the stack and print its export lines"),
                          ("stop", "stop exactly what start started"),
                          ("env", "print the export lines of the running stack"),
                          ("status", "show the stack's processes and ports as JSON")):
        command = sub.add_parser(name, help=summary)
        command.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR),
                             help="where pids, ports, logs, the MLflow database and the Ray token live "
                                  "(default: runs/stack)")
        if name == "start":
            command.add_argument("--bucket", default="upsr", help="S3 bucket to create (default: upsr)")
            command.add_argument("--auth", choices=("token", "disabled"), default="token",
                                 help="Ray authentication (RAY_AUTH_MODE); default: token")
            command.add_argument("--num-cpus", type=int, help="CPUs the Ray head offers (default: all)")
            command.add_argument("--num-gpus", type=int, help="GPUs the Ray head offers (default: detected)")
            command.add_argument("--object-store-mb", type=int, default=1024,
                                 help="Ray object store size in MiB (default: 1024)")
            command.add_argument("--mlflow-workers", type=int, default=1,
                                 help="MLflow server worker processes (default: 1; each costs ~0.7 GB)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        if args.command == "start":
            state = start(args)
            sys.stdout.write(env_lines(state))
        elif args.command == "stop":
            stop(args)
        else:
            state = read_state(Path(args.state_dir).resolve())
            if state is None or not running(state):
                raise StackError(f"no running stack under {args.state_dir}")
            if args.command == "env":
                sys.stdout.write(env_lines(state))
            else:
                alive = running(state)
                status = {name: {"pid": pid, "alive": name in alive} for name, pid in state["pids"].items()}
                sys.stdout.write(json.dumps({"stack_id": state["stack_id"], "processes": status,
                                             "ports": state["ports"], "env": state["env"]}, indent=2) + "\n")
    except StackError as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
