"""The Dockerfile, checked statically (building it needs a container runtime; the
commands that proved it builds are in docs/operations.md, "Container image"):
a build stage that installs both distributions and a slim runtime stage that
copies only the virtualenv, a non-root USER, a HEALTHCHECK through
grpc.health.v1, EXPOSE for the ports the image's settings serve, and every
file it copies present in the build context. The health check script itself
runs against a live server: 0 while SERVING, 1 once the drain begins and when
nothing listens."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import signal
import sys
import tomllib
from pathlib import Path, PurePosixPath

from tests.conftest import start_serve_process
from tests.dockerfile import DOCKERFILE, ROOT, Dockerfile, parse
from tokenwire_server.config import ENV_PREFIX, Config, load_config, setting_names

IMAGE = parse()
HEALTHCHECK_SCRIPT = ROOT / "deploy" / "healthcheck.py"


def runtime_env(image: Dockerfile = IMAGE) -> dict[str, str]:
    return image.final.env()


def test_two_stages_build_then_a_runtime_that_copies_only_the_install() -> None:
    assert [s.name for s in IMAGE.stages] == ["build", "runtime"]
    build, runtime = IMAGE.stages
    # Same interpreter in both: the virtualenv links to the base image's Python.
    assert build.base == runtime.base == "${PYTHON_IMAGE}"
    assert IMAGE.args["PYTHON_IMAGE"].endswith("-slim-bookworm"), "a slim base by default"
    builds = " ".join(i.arguments for i in build.all("RUN"))
    # Both distributions: the client (clients/python) and the server (.).
    assert re.search(r"pip wheel .*--wheel-dir /wheels \./clients/python \.(\s|$)", builds)
    assert "pip install /wheels/*.whl" in builds
    assert "tokenwire serve --check-config" in builds, "the build checks the shipped config"
    copied_from_build = [i.arguments for i in runtime.all("COPY") if "--from=" in i.arguments]
    assert copied_from_build == ["--from=build /opt/tokenwire /opt/tokenwire"]
    # The runtime stage installs nothing: no pip, no compiler, no package manager.
    for run in runtime.all("RUN"):
        assert not re.search(r"\b(pip|apt-get|apt|gcc|make)\b", run.arguments), run.arguments


def test_the_runtime_user_is_not_root_and_owns_only_its_data_directory() -> None:
    (user,) = IMAGE.final.all("USER")
    uid, _, gid = user.arguments.partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric (runAsNonRoot can verify it) and not root"
    assert gid.isdigit() and int(gid) != 0
    setup = " ".join(i.arguments for i in IMAGE.final.all("RUN"))
    assert f"useradd --system --uid {uid} --gid {gid}" in setup
    assert f"chown {uid}:{gid} /var/lib/tokenwire" in setup
    (workdir,) = IMAGE.final.all("WORKDIR")
    assert workdir.arguments == "/var/lib/tokenwire", "relative paths (the audit file) land there"
    # The user writes nowhere else: the install and the config stay root's.
    assert "/opt/tokenwire" not in setup.split("chown", 1)[1]


def test_healthcheck_asks_grpc_health_with_the_images_python() -> None:
    (healthcheck,) = IMAGE.final.all("HEALTHCHECK")
    options, _, command = healthcheck.arguments.partition(" CMD ")
    assert re.search(r"--interval=\d+s", options) and re.search(r"--timeout=\d+s", options)
    argv = json.loads(command)
    assert argv[0] == "/opt/tokenwire/bin/python", "the virtualenv has grpcio and grpc_health"
    copies = {i.arguments.split()[-1]: i.arguments.split()[-2] for i in IMAGE.final.all("COPY")}
    assert copies[argv[1]] == "deploy/healthcheck.py"
    assert HEALTHCHECK_SCRIPT.is_file()


def test_the_image_exposes_the_ports_its_settings_serve(tmp_path: Path) -> None:
    """The image's ENV over the config it ships, resolved as `tokenwire serve` would."""
    env = runtime_env()
    config_path = env["TOKENWIRE_CONFIG"]
    copies = {i.arguments.split()[-1]: i.arguments.split()[-2] for i in IMAGE.final.all("COPY")}
    shipped = ROOT / copies[config_path]
    assert shipped == ROOT / "deploy" / "tokenwire.example.toml"
    config = load_config({}, env=env, file=shipped)
    (expose,) = IMAGE.final.all("EXPOSE")
    ports = sorted(int(p.split("/")[0]) for p in expose.arguments.split())
    assert ports == sorted([config.network.port, config.observability.metrics_port])
    assert config.network.host == "0.0.0.0", "a container is dialled from outside"
    assert config.observability.metrics_host == "0.0.0.0"
    assert not PurePosixPath(config.audit.audit_path).is_absolute(), (
        "the audit file follows WORKDIR (the writable directory), not an absolute path"
    )
    # Every TOKENWIRE_ variable the image sets is a real setting (or the config file).
    names = {ENV_PREFIX + name.upper() for name in setting_names()} | {"TOKENWIRE_CONFIG"}
    assert {k for k in env if k.startswith(ENV_PREFIX)} <= names
    assert config != Config()


def test_entrypoint_is_the_console_script_as_pid_1() -> None:
    (entrypoint,) = IMAGE.final.all("ENTRYPOINT")
    (cmd,) = IMAGE.final.all("CMD")
    assert entrypoint.exec_form() == ["tokenwire"], "exec form: SIGTERM reaches the server"
    assert cmd.exec_form() == ["serve"]
    assert runtime_env()["PATH"].startswith("/opt/tokenwire/bin:")


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for what this file uses: the last matching pattern
    wins, `!` re-includes, a pattern matches a path or any of its parents."""
    ignored = False
    parts = PurePosixPath(path).parts
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if body.startswith("**/"):
            tail = body[3:]
            hit = any(fnmatch.fnmatch(part, tail) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(c, body) for c in candidates)
        if hit:
            ignored = not negate
    return ignored


def test_every_file_the_dockerfile_copies_is_in_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for stage in IMAGE.stages:
        for copy in stage.all("COPY"):
            words = copy.arguments.split()
            if not any(w.startswith("--from=") for w in words):
                sources += words[:-1]
    assert sources, "the Dockerfile copies from the context"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not _ignored(source.rstrip("/"), patterns), f"COPY {source}: .dockerignore drops it"
    # What the wheels are built from is there; local clutter is not.
    assert not _ignored("server/tokenwire_server/server.py", patterns)
    assert not _ignored("server/tokenwire_server/governance/policies/default.yaml", patterns)
    for clutter in ("clients/typescript/node_modules", ".git", "bench", "tests", "clients/go"):
        assert _ignored(clutter, patterns), clutter
    assert _ignored("clients/python/build/lib/tokenwire/cli.py", patterns), "stale build trees"
    assert _ignored("server/tokenwire_server/__pycache__/server.cpython-311.pyc", patterns)


def test_both_distributions_build_from_the_context() -> None:
    """The two pyproject files the build stage's `pip wheel` reads, as the
    packaging split has them (the client in clients/python, the server on top)."""
    for pyproject in (ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml"):
        if pyproject.is_file():
            project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
            readme = pyproject.parent / project.get("readme", "README.md")
            assert readme.is_file(), f"{pyproject}: its readme {readme} is missing"


async def _healthcheck(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HEALTHCHECK_SCRIPT),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_the_health_check_script_follows_the_servers_health() -> None:
    process, address = await start_serve_process("--drain-delay", "3")
    try:
        assert await _healthcheck(address) == (0, "")
        code, err = await _healthcheck(address, "--service", "tokenwire.v1.RespondService")
        assert code == 0, err
        code, err = await _healthcheck(address, "--service", "no.such.Service")
        assert code == 1 and "NOT_FOUND" in err, err
        process.send_signal(signal.SIGTERM)  # the drain starts: NOT_SERVING for drain_delay
        await asyncio.sleep(0.5)
        code, err = await _healthcheck(address)
        assert code == 1 and "NOT_SERVING" in err, err
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
        code, err = await _healthcheck(address, "--timeout", "1")
        assert code == 1 and "UNAVAILABLE" in err, err
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_the_dockerfile_is_where_the_docs_say() -> None:
    assert DOCKERFILE.is_file()
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "## Container image" in operations
    assert "podman build" in operations and "--isolation=chroot" in operations
