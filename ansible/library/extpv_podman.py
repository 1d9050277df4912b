#!/usr/bin/python
# Copyright extpv developers. Licensed under the Apache License, Version 2.0.
"""Ansible module: a podman image built from a context, its container running as specified."""

# Ansible's module layout puts DOCUMENTATION/EXAMPLES/RETURN above the imports.
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: extpv_podman
short_description: Build a podman image from a context and keep one container running as specified
description:
  - Talks to the podman API service through podman-py (the C(podman) Python package); starts
    C(podman system service) on I(socket) when nothing answers there.
  - The image is rebuilt only when the build context (its files, as podman would send them),
    the Containerfile or the build arguments changed; a digest of them is kept in the image label
    C(org.extpv.context-digest).
  - The container is recreated only when its specification (image, command, options, volumes,
    I(config_digest)) changed; a digest is kept in the label C(org.extpv.spec-digest). A stopped
    container with the right specification is started. C(changed) is reported only for these.
  - After a start, the module waits up to I(ready_timeout) seconds for I(health_cmd) to succeed
    inside the container and fails with the container's logs if it does not.
options:
  socket:
    description: Unix socket of the podman API service.
    type: path
    default: /run/podman/podman.sock
  containers_conf:
    description: containers.conf for a service this module starts (C(CONTAINERS_CONF)).
    type: path
  image:
    description: Image reference to build and run, e.g. C(localhost/pvhost:latest).
    type: str
    required: true
  context:
    description: Build context directory; required unless I(build=false).
    type: path
  containerfile:
    description: Containerfile name inside I(context).
    type: str
    default: Containerfile
  build_args:
    description: Build arguments (C(ARG)s).
    type: dict
    default: {}
  build_timeout:
    description: Seconds the image build may take before it is abandoned.
    type: float
    default: 900
  build:
    description: Build the image; with C(false) the image must exist already.
    type: bool
    default: true
  name:
    description: Container name; required unless I(state=built).
    type: str
  state:
    description: C(running) (built, created, started and healthy), C(built) (only the image) or
      C(absent) (container removed).
    type: str
    choices: [running, built, absent]
    default: running
  command:
    description: Command (argv) overriding the image's C(CMD).
    type: list
    elements: str
  user:
    description: User inside the container.
    type: str
  privileged:
    description: Run privileged.
    type: bool
    default: false
  pid_mode:
    description: PID namespace (C(host) to share the host's).
    type: str
  cgroupns:
    description: cgroup namespace mode (C(host) to share the host's).
    type: str
  network_mode:
    description: Network namespace (C(host) to share the host's, so that pvhost's loopback
      metrics listener is the host's).
    type: str
  volumes:
    description: Bind mounts C(SRC:DST[:OPTS]); sources are created as directories if missing.
    type: list
    elements: str
    default: []
  env:
    description: Environment variables.
    type: dict
    default: {}
  restart_policy:
    description: Restart policy (C(always), C(on-failure), C(no)).
    type: str
    default: always
  health_cmd:
    description: Health check argv, set on the container and used to wait for readiness.
    type: list
    elements: str
  health_interval:
    description: Seconds between podman's own health checks (systemd timers); 0 creates no
      timer, for hosts without systemd, where the module's readiness wait is the check.
    type: int
    default: 30
  ready_timeout:
    description: Seconds to wait for I(health_cmd) to succeed after a start.
    type: float
    default: 60
  config_digest:
    description: Opaque token of files the container reads (its configuration); a new value
      recreates the container so it rereads them.
    type: str
    default: ""
requirements: [podman (Python package podman-py >= 5), podman >= 4.3]
"""

EXAMPLES = r"""
- name: Run pvhost
  extpv_podman:
    image: localhost/pvhost:latest
    context: /var/lib/extpv/build/pvhost
    build_args: {BASE_IMAGE: localhost/extpv-base:bookworm}
    name: pvhost
    user: root
    privileged: true
    pid_mode: host
    cgroupns: host
    network_mode: host
    volumes: [/sys/fs/cgroup:/sys/fs/cgroup:rw, /run/extpv:/run/extpv]
    health_cmd: [pvctl, status]
"""

RETURN = r"""
image_id:
  description: ID of the image the container runs.
  type: str
  returned: state=running or state=built
container_id:
  description: ID of the container.
  type: str
  returned: state=running
actions:
  description: What was done, in order (e.g. C(started podman service), C(built image)).
  type: list
  elements: str
  returned: always
"""

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    import podman
    import requests
    from podman import api as podman_api
    from podman.errors import APIError, BuildError

    HAS_PODMAN = True
except ImportError:
    HAS_PODMAN = False

CONTEXT_LABEL = "org.extpv.context-digest"
SPEC_LABEL = "org.extpv.spec-digest"
SERVICE_START_TIMEOUT = 20.0
STOP_TIMEOUT = 10


class Failure(Exception):
    """A failure to report to Ansible, with details for the operator."""

    def __init__(self, msg, **details):
        super().__init__(msg)
        self.details = details


def client_for(socket):
    return podman.PodmanClient(base_url=f"unix://{socket}", timeout=600)


def ping(socket):
    if not Path(socket).exists():
        return False
    try:
        with client_for(socket) as client:
            return bool(client.ping())
    except Exception:
        return False


def ensure_service(params, check_mode, actions):
    """Start `podman system service` on the socket unless something answers there."""
    socket = params["socket"]
    if ping(socket):
        return
    actions.append("started podman service")
    if check_mode:
        return
    Path(socket).parent.mkdir(parents=True, exist_ok=True)
    Path(socket).unlink(missing_ok=True)
    # The service outlives this run: it must not keep the caller's directory or PATH (a
    # checkout that is later deleted left every container start through it failing with
    # "write child: broken pipe": conmon cannot start in a deleted working directory).
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    if params["containers_conf"]:
        env["CONTAINERS_CONF"] = params["containers_conf"]
    log_path = Path("/var/log/extpv-podman-service.log")
    with open(log_path, "ab") as log:
        # A daemon of its own: a new session, no pipes to this short-lived module.
        subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{socket}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + SERVICE_START_TIMEOUT
    while time.monotonic() < deadline:
        if ping(socket):
            return
        time.sleep(0.2)
    raise Failure(
        f"podman system service did not answer on {socket} within {SERVICE_START_TIMEOUT:.0f} s",
        hint=f"see {log_path}",
    )


def context_digest(params):
    """Digest of what a build would send: the context's files (honouring .containerignore)."""
    context = params["context"]
    excludes = podman_api.prepare_containerignore(context)
    h = hashlib.sha256()
    h.update(json.dumps([params["containerfile"], params["build_args"]], sort_keys=True).encode())
    root = Path(context)
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        rel = str(path.relative_to(root))
        if any(Path(rel).match(pattern) for pattern in excludes):
            continue
        h.update(rel.encode() + b"\0" + oct(path.lstat().st_mode).encode() + b"\0")
        h.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
    return h.hexdigest()


def find_image(client, ref):
    return client.images.get(ref) if client.images.exists(ref) else None


def ensure_image(client, params, check_mode, actions):
    ref = params["image"]
    image = find_image(client, ref)
    if not params["build"]:
        if image is None:
            raise Failure(f"image {ref} does not exist and build=false")
        return image
    if not Path(params["context"] or "").is_dir():
        raise Failure(f"build context {params['context']!r} is not a directory")
    if not (Path(params["context"]) / params["containerfile"]).is_file():
        raise Failure(f"no {params['containerfile']} in build context {params['context']}")
    digest = context_digest(params)
    if image is not None and (image.labels or {}).get(CONTEXT_LABEL) == digest:
        return image
    actions.append("built image" if image is None else "rebuilt image (context changed)")
    if check_mode:
        return image
    try:
        image, _logs = client.images.build(
            path=params["context"],
            dockerfile=params["containerfile"],
            tag=ref,
            buildargs={k: str(v) for k, v in params["build_args"].items()},
            labels={CONTEXT_LABEL: digest},
            rm=True,
            forcerm=True,
            layers=True,
            timeout=params["build_timeout"],
        )
    except requests.exceptions.Timeout as err:
        raise Failure(
            f"building {ref} took longer than {params['build_timeout']:.0f} s (build_timeout)",
            hint="a RUN step of the Containerfile hangs; try `podman build` by hand",
        ) from err
    except BuildError as err:
        log = "".join(build_lines(err.build_log))
        raise Failure(f"building {ref} failed: {err}", build_log=log[-8000:]) from err
    return image


def build_lines(chunks):
    """The text of podman's build log, whose chunks are JSON objects (bytes) with a stream."""
    for chunk in chunks or []:
        for line in (
            chunk.decode(errors="replace") if isinstance(chunk, bytes) else str(chunk)
        ).splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                yield line + "\n"
                continue
            yield (
                record.get("stream") or record.get("error", "")
                if isinstance(record, dict)
                else line
            )


def volume_map(volumes):
    mounts = {}
    for spec in volumes:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[0].startswith("/"):
            raise Failure(f"volume {spec!r} is not SRC:DST[:OPTS] with an absolute SRC")
        options = parts[2].split(",") if len(parts) == 3 else []
        mounts[parts[0]] = {"bind": parts[1], "extended_mode": options}
    return mounts


def spec_of(params, image_id):
    keys = (
        "command",
        "user",
        "privileged",
        "pid_mode",
        "cgroupns",
        "network_mode",
        "volumes",
        "env",
        "restart_policy",
        "health_cmd",
        "health_interval",
        "config_digest",
    )
    spec = {key: params[key] for key in keys}
    spec["image_id"] = image_id
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def find_container(client, name):
    if not client.containers.exists(name):
        return None
    container = client.containers.get(name)
    container.reload()
    return container


def remove_container(container):
    container.reload()
    if container.status in ("running", "paused", "stopping"):
        container.stop(timeout=STOP_TIMEOUT)
    container.remove(force=True)


def create_container(client, params, image, digest):
    for spec in params["volumes"]:
        Path(spec.split(":")[0]).mkdir(parents=True, exist_ok=True)
    kwargs = {
        "name": params["name"],
        "labels": {SPEC_LABEL: digest},
        "privileged": params["privileged"],
        "volumes": volume_map(params["volumes"]),
        "environment": params["env"],
        "restart_policy": {"Name": params["restart_policy"]},
        "detach": True,
    }
    if params["command"]:
        kwargs["command"] = params["command"]
    if params["user"]:
        kwargs["user"] = params["user"]
    if params["pid_mode"]:
        kwargs["pid_mode"] = params["pid_mode"]
    if params["cgroupns"]:
        kwargs["cgroupns"] = params["cgroupns"]
    if params["network_mode"]:
        kwargs["network_mode"] = params["network_mode"]
    if params["health_cmd"]:
        second = 1_000_000_000
        kwargs["healthcheck"] = {
            "Test": ["CMD", *params["health_cmd"]],
            "Interval": params["health_interval"] * second,
            "Timeout": 10 * second,
            "StartPeriod": 20 * second,
            "Retries": 3,
        }
    return client.containers.create(image.id, **kwargs)


def container_logs(container):
    try:
        raw = container.logs(stdout=True, stderr=True, tail=60)
        if not isinstance(raw, bytes | str):
            raw = b"".join(raw)
        return raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    except (APIError, OSError) as err:
        return f"(logs unavailable: {err})"


def wait_ready(container, params):
    """Wait until the container runs and its health command succeeds, within ready_timeout."""
    deadline = time.monotonic() + params["ready_timeout"]
    last = "never ran"
    while True:
        container.reload()
        if container.status not in ("running", "created", "configured"):
            last = f"container is {container.status}"
        elif container.status == "running":
            if not params["health_cmd"]:
                return
            code, out = container.exec_run(params["health_cmd"], user=params["user"] or None)
            if code == 0:
                return
            text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
            last = f"{' '.join(params['health_cmd'])} exited {code}: {text.strip()[-500:]}"
        if time.monotonic() >= deadline:
            raise Failure(
                f"container {params['name']} not ready within {params['ready_timeout']:.0f} s "
                f"({last})",
                logs=container_logs(container),
            )
        time.sleep(0.5)


def ensure_running(client, params, check_mode, actions):
    image = ensure_image(client, params, check_mode, actions)
    if image is None:  # check mode, image would be built
        actions.append("created and started container")
        return {}
    digest = spec_of(params, image.id)
    container = find_container(client, params["name"])
    if container is not None and (container.labels or {}).get(SPEC_LABEL) != digest:
        actions.append("removed outdated container")
        if not check_mode:
            remove_container(container)
        container = None
    if container is None:
        actions.append("created and started container")
        if check_mode:
            return {"image_id": image.id}
        container = create_container(client, params, image, digest)
        container.start()
    elif container.status != "running":
        actions.append(f"started container (was {container.status})")
        if check_mode:
            return {"image_id": image.id, "container_id": container.id}
        container.start()
    if not check_mode:
        wait_ready(container, params)  # every run: a running but broken service is not "ok"
    return {"image_id": image.id, "container_id": container.id}


def ensure_absent(client, params, check_mode, actions):
    container = find_container(client, params["name"])
    if container is not None:
        actions.append("removed container")
        if not check_mode:
            remove_container(container)
    return {}


def main():
    module = AnsibleModule(
        argument_spec={
            "socket": {"type": "path", "default": "/run/podman/podman.sock"},
            "containers_conf": {"type": "path"},
            "image": {"type": "str", "required": True},
            "context": {"type": "path"},
            "containerfile": {"type": "str", "default": "Containerfile"},
            "build_args": {"type": "dict", "default": {}},
            "build": {"type": "bool", "default": True},
            "build_timeout": {"type": "float", "default": 900.0},
            "name": {"type": "str"},
            "state": {
                "type": "str",
                "choices": ["running", "built", "absent"],
                "default": "running",
            },
            "command": {"type": "list", "elements": "str"},
            "user": {"type": "str"},
            "privileged": {"type": "bool", "default": False},
            "pid_mode": {"type": "str"},
            "cgroupns": {"type": "str"},
            "network_mode": {"type": "str"},
            "volumes": {"type": "list", "elements": "str", "default": []},
            "env": {"type": "dict", "default": {}},
            "restart_policy": {"type": "str", "default": "always"},
            "health_cmd": {"type": "list", "elements": "str"},
            "health_interval": {"type": "int", "default": 30},
            "ready_timeout": {"type": "float", "default": 60.0},
            "config_digest": {"type": "str", "default": ""},
        },
        required_if=[
            ("build", True, ("context",)),
            ("state", "running", ("name",)),
            ("state", "absent", ("name",)),
        ],
        supports_check_mode=True,
    )
    if not HAS_PODMAN:
        module.fail_json(msg=missing_required_lib("podman (podman-py)"))
    params = module.params
    actions = []
    try:
        ensure_service(params, module.check_mode, actions)
        if module.check_mode and actions:
            module.exit_json(changed=True, actions=[*actions, "(rest unknown until it runs)"])
        with client_for(params["socket"]) as client:
            if params["state"] == "absent":
                result = ensure_absent(client, params, module.check_mode, actions)
            elif params["state"] == "built":
                image = ensure_image(client, params, module.check_mode, actions)
                result = {"image_id": image.id} if image is not None else {}
            else:
                result = ensure_running(client, params, module.check_mode, actions)
    except Failure as err:
        module.fail_json(msg=str(err), actions=actions, **err.details)
    except APIError as err:
        module.fail_json(msg=f"podman API error: {err}", actions=actions)
    module.exit_json(changed=bool(actions), actions=actions, **result)


if __name__ == "__main__":
    main()
