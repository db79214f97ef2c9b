"""Every file in ``deploy/`` is checked against the code, since no container engine runs here.

- every ``outbox`` command line in them (Dockerfile, compose, Kubernetes, systemd) is parsed by the real
  click command tree, so an unknown subcommand or flag, or a bad value, fails; their ``OUTBOX_*``
  variables are twins of real options, and their values pass the same validation as at start-up;
- ports agree between flags, environment, probes, scrape annotations and health checks, and the probe
  paths answer on a real relay's metrics port;
- alert expressions and dashboard queries name only metrics that a real relay (or consumer) exports,
  read from a scrape of ``outbox relay --metrics-port`` (the names are those of ``relay/metrics.py``);
- stopping gracefully fits: every grace period is longer than the stop timeout in use.
"""

from __future__ import annotations

import configparser
import contextlib
import importlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import sqlalchemy as sa
import yaml

import outbox
from outbox import cli
from outbox._dialects import create_engine
from outbox.cli._config import _KINDS, Settings
from outbox.cli._options import SHARED_NAMES, build_settings
from tests.conftest import ROOT, wait_until

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
OUR_DOCKERFILE = "deploy/Dockerfile"
#: stands in for a value kept in a secret, so that the settings can still be validated
PLACEHOLDER_URL = "postgresql://user:secret@db.example/outbox"
#: what Prometheus adds itself; everything else must come from our processes
PROMETHEUS_METRICS = {"up"}


# --- the code's side: the command tree ------------------------------------------------------------------


def walk_commands(group: click.Group = cli.outbox) -> Iterator[click.Command]:
    yield group
    for command in group.commands.values():
        if isinstance(command, click.Group):
            yield from walk_commands(command)
        else:
            yield command


def option_envvars() -> set[str]:
    names: set[str] = set()
    for command in walk_commands():
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                names.add(envvar)
            elif envvar:
                names.update(envvar)
    return names


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with no OUTBOX_* variable but those of ``env``, restored afterwards."""
    saved = dict(os.environ)
    try:
        for name in [n for n in os.environ if n.startswith("OUTBOX_")]:
            del os.environ[name]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@dataclass
class Invocation:
    """An ``outbox`` command line as click parsed it, with the settings it would start with."""

    path: tuple[str, ...]
    params: dict[str, Any]
    settings: Settings


def parse_outbox(argv: Sequence[str], env: Mapping[str, str]) -> Invocation:
    """Parse ``outbox ARGV`` with environment ``env`` exactly as the CLI would, without running it.

    Fails the test on an unknown command or option, a value click rejects, an OUTBOX_* variable that is
    no option's twin, or settings that do not validate.
    """
    unknown = sorted(n for n in env if n.startswith("OUTBOX_") and n not in option_envvars())
    assert not unknown, f"environment variables that are no option's twin: {unknown}"
    args = list(argv)
    command: click.Command = cli.outbox
    parent = click.Context(command, info_name="outbox")
    path: list[str] = []
    while isinstance(command, click.Group):
        assert args, f"`outbox {' '.join(path)}` needs a subcommand"
        name = args.pop(0)
        found = command.get_command(parent, name)
        assert found is not None, f"`outbox {' '.join([*path, name])}`: no such command"
        path.append(name)
        command = found
        if isinstance(command, click.Group):
            parent = click.Context(command, info_name=name, parent=parent)
    with environment(env):
        try:
            ctx = command.make_context(path[-1], args, parent=parent)
        except click.ClickException as exc:
            pytest.fail(f"`outbox {shlex.join(argv)}`: {exc.format_message()}", pytrace=False)
        names = tuple(
            n
            for n in ctx.params
            if n in _KINDS or n in SHARED_NAMES or n in ("strict_order_topic", "kafka_route")
        )
        settings = build_settings(ctx, names)
    return Invocation(tuple(path), dict(ctx.params), settings)


# --- the code's side: what a relay serves ----------------------------------------------------------------


@dataclass
class Served:
    metrics: set[str]
    status: dict[str, int] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def sample_names(exposition: str) -> set[str]:
    """The series names a Prometheus text exposition offers, from its TYPE lines and its samples."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "counter":
                names.update({name.removesuffix("_total") + "_total"})
            elif kind in ("histogram", "summary"):
                names.update(
                    {f"{name}_sum", f"{name}_count"} | ({f"{name}_bucket"} if kind == "histogram" else set())
                )
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A real ``outbox relay --metrics-port`` (on SQLite, one message delivered), and what it serves."""
    path = tmp_path_factory.mktemp("deploy") / "relay.db"
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    with engine.begin() as conn:
        outbox.upgrade(conn)
        outbox.add(conn, "cli.ok", {"n": 1})
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    command = [sys.executable, "-m", "outbox", "relay", "--database-url", url]
    command += ["--app", "tests.apps.cli_app:registry", "--poll-interval", "0.1"]
    command += ["--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--metrics-interval", "0.2"]
    command += ["--maintenance-interval", "0.2"]
    log = (path.parent / "relay.log").open("wb")
    relay = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:

        def complete() -> str | None:  # the gauges were read and the maintenance thread checked once
            status, text = _get(base + "/metrics")
            wanted = ("outbox_pending_messages", "outbox_stuck_messages", "outbox_messages_delivered_total{")
            return text if status == 200 and all(w in text for w in wanted) else None

        exposition = wait_until(complete, timeout=30, interval=0.2, what="a complete scrape of the relay")
        assert isinstance(exposition, str)
        names = sample_names(exposition)
        from prometheus_client import generate_latest

        from consumers._metrics import ConsumerMetrics  # the consumer's own port serves these

        names |= sample_names(generate_latest(ConsumerMetrics("g", process=False).registry).decode())
        result = Served(names)
        for probe in ("/healthz", "/readyz", "/metrics", "/no-such-path"):
            result.status[probe] = _get(base + probe)[0]
        yield result
    finally:
        relay.terminate()
        relay.wait(30)
        log.close()
        engine.dispose()


# --- the files ------------------------------------------------------------------------------------------


@dataclass
class Dockerfile:
    stages: list[str]  # the FROM image of each stage
    env: dict[str, str]  # ENV of the final stage
    user: str | None
    entrypoint: list[str]
    cmd: list[str]
    expose: list[int]
    copies: list[list[str]]  # COPY sources (without --from)
    runs: list[str]


def read_dockerfile(path: Path = DEPLOY / "Dockerfile") -> Dockerfile:
    text = re.sub(r"\\\n", " ", path.read_text())
    result = Dockerfile([], {}, None, [], [], [], [], [])
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            result.stages.append(rest.split()[0])
            result.env, result.user, result.runs = {}, None, []
        elif instruction == "ENV":
            result.env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
        elif instruction == "USER":
            result.user = rest.strip()
        elif instruction in ("ENTRYPOINT", "CMD"):
            value = json.loads(rest)  # the exec form: a signal reaches the relay itself, not a shell
            assert isinstance(value, list), f"{instruction} must use the JSON (exec) form"
            setattr(result, instruction.lower(), value)
        elif instruction == "EXPOSE":
            result.expose += [int(p.split("/")[0]) for p in rest.split()]
        elif instruction == "COPY":
            parts = shlex.split(rest)
            if not any(p.startswith("--from") for p in parts):
                result.copies.append(parts[:-1])
        elif instruction == "RUN":
            result.runs.append(rest)
    return result


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d for d in k8s_documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    """A container's environment; values from a Secret become placeholders (checked separately)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            assert "secretKeyRef" in item["valueFrom"], item
            env[item["name"]] = PLACEHOLDER_URL if item["name"] == "OUTBOX_DATABASE_URL" else "secret"
    return env


def duration_seconds(text: str | int | float) -> float:
    if isinstance(text, int | float):
        return float(text)
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    assert total, f"not a duration: {text!r}"
    return total


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers not followed by ``(`` (functions) and outside
    label matchers and ``by``/``without`` lists."""
    cleaned = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    cleaned = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", cleaned)
    cleaned = re.sub(r"\[[^\]]*\]", "", cleaned)  # range selectors
    cleaned = re.sub(r'"[^"]*"', "", cleaned)  # strings
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", cleaned):
        following = cleaned[match.end() :].lstrip()
        word = match.group(0)
        if following.startswith("(") or word in ("and", "or", "unless", "bool", "offset"):
            continue
        names.add(word)
    return names


# --- the checks -------------------------------------------------------------------------------------------


KNOWN_FILES = {
    "Dockerfile": "test_dockerfile",
    "compose.yaml": "test_compose",
    "kubernetes/kustomization.yaml": "test_kubernetes_relay",
    "kubernetes/relay-deployment.yaml": "test_kubernetes_relay",
    "kubernetes/relay-pdb.yaml": "test_kubernetes_relay",
    "kubernetes/migrate-job.yaml": "test_kubernetes_relay",
    "kubernetes/secret.example.yaml": "test_kubernetes_relay",
    "systemd/outbox-relay.service": "test_systemd_unit",
    "prometheus/alerts.yaml": "test_alert_rules",
    "prometheus/prometheus.yml": "test_alert_rules",
    "grafana/outbox.json": "test_grafana_dashboard",
}


def test_every_deploy_file_is_checked() -> None:
    present = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file()}
    assert present == set(KNOWN_FILES), "a file in deploy/ that no test checks (or one that is gone)"


def test_dockerfile() -> None:
    image = read_dockerfile()
    assert all(stage == "python:3.12-slim" for stage in image.stages), image.stages
    assert image.user is not None and image.user.split(":")[0] not in ("root", "0"), "runs as root"
    assert image.entrypoint == ["outbox"] and image.cmd == ["relay"]
    assert any("pip install" in run for run in image.runs), "the final stage installs the package"
    for sources in image.copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    invocation = parse_outbox(
        image.entrypoint[1:] + image.cmd, {**image.env, "OUTBOX_DATABASE_URL": PLACEHOLDER_URL}
    )
    assert invocation.path == ("relay",)
    assert image.expose == [invocation.params["metrics_port"]], "EXPOSE is the metrics port"


def _compose() -> dict[str, Any]:
    compose = load_yaml(DEPLOY / "compose.yaml")
    assert isinstance(compose, dict)
    return compose


def test_compose(served: Served) -> None:
    services: dict[str, Any] = _compose()["services"]
    image = read_dockerfile()
    assert services["postgres"]["image"].startswith("postgres:")
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:"), "the official Apache Kafka image"
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"], "KRaft: no ZooKeeper"
    assert not any("zookeeper" in name for name in services)
    commands: dict[str, Invocation] = {}
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        if service.get("build", {}).get("dockerfile") != OUR_DOCKERFILE:
            continue
        assert (ROOT / "deploy" / service["build"]["context"] / OUR_DOCKERFILE).is_file()
        env = {**image.env, **{k: str(v) for k, v in service.get("environment", {}).items()}}
        entrypoint = service.get("entrypoint", image.entrypoint)
        command = [str(c) for c in service.get("command", image.cmd)]
        if entrypoint == ["outbox"]:
            commands[name] = parse_outbox(command, env)
        else:  # the example app: a module of this repository, and arguments its parser accepts
            assert entrypoint[:2] == ["python", "-m"], entrypoint
            module = importlib.import_module(entrypoint[2])
            module.build_parser().parse_args(command)
    assert commands["migrate"].path == ("db", "upgrade")
    relay, consumer = commands["relay"], commands["consumer"]
    assert relay.path == ("relay",) and consumer.path == ("consume",)
    assert services["relay"]["deploy"]["replicas"] == 2
    assert relay.settings.kafka_bootstrap_servers and consumer.params["group"]
    assert "shop" in services, "the example app"
    # graceful stop fits, ports agree, the health check asks a real endpoint
    for name in ("relay", "consumer"):
        grace = duration_seconds(services[name]["stop_grace_period"])
        assert grace > commands[name].settings.stop_timeout, f"{name}: stop_grace_period <= stop timeout"
    port = relay.params["metrics_port"]
    assert [int(p) for p in services["relay"]["expose"]] == [port]
    check = " ".join(services["relay"]["healthcheck"]["test"])
    match = re.search(r"http://[^:/]+:(\d+)(/\w+)", check)
    assert match and int(match.group(1)) == port and served.status[match.group(2)] == 200, check


def test_kubernetes_relay(served: Served) -> None:
    image = read_dockerfile()
    kustomization = load_yaml(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    [deployment] = k8s("Deployment", "outbox-relay")
    spec = deployment["spec"]
    template = spec["template"]
    labels = template["metadata"]["labels"]
    assert spec["replicas"] >= 2, "several relays side by side"
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    [pdb] = k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), "the PDB covers the relays"
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or pdb["spec"].get("minAvailable", 0) < spec["replicas"]

    [container] = template["spec"]["containers"]
    env = {**image.env, **container_env(container)}
    assert "command" not in container, "keep the image's ENTRYPOINT (outbox); args replace its CMD"
    relay = parse_outbox(container["args"], env)
    assert relay.path == ("relay",)
    # the database URL comes from a Secret that has that key
    [url] = [e for e in container["env"] if e["name"] == "OUTBOX_DATABASE_URL"]
    ref = url["valueFrom"]["secretKeyRef"]
    [secret] = k8s("Secret", ref["name"])
    assert ref["key"] in secret["stringData"]
    # one metrics port everywhere: the flag, the container port, the scrape annotations, the probes
    port = relay.params["metrics_port"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == port
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert served.status[annotations["prometheus.io/path"]] == 200
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and served.status[path] == 200
        assert ports.get(get["port"], get["port"]) == port, f"{probe} asks another port"
    # Kubernetes must not SIGKILL a relay that is still finishing within its stop timeout
    assert template["spec"]["terminationGracePeriodSeconds"] > relay.settings.stop_timeout
    # the migration Job
    [job] = k8s("Job")
    [upgrade] = job["spec"]["template"]["spec"]["containers"]
    assert parse_outbox(upgrade["args"], {**image.env, **container_env(upgrade)}).path == ("db", "upgrade")
    for pod in (template["spec"], job["spec"]["template"]["spec"]):
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read(DEPLOY / "systemd" / "outbox-relay.service")
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "outbox" and Path(argv[0]).is_absolute()
    env = dict(item.split("=", 1) for item in shlex.split(service["Environment"]))
    env["OUTBOX_DATABASE_URL"] = PLACEHOLDER_URL  # from EnvironmentFile, which holds the secret
    assert service["EnvironmentFile"].startswith("/etc/")
    relay = parse_outbox(argv[1:], env)
    assert relay.path == ("relay",)
    assert service["User"] not in ("root", "0")
    assert service["KillSignal"] == "SIGTERM"
    assert duration_seconds(service["TimeoutStopSec"] + "s") > relay.settings.stop_timeout
    assert {int(code) for code in service["RestartPreventExitStatus"].split()} <= {
        cli.RET_USAGE,
        cli.RET_CONFIG,
    }
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_alert_rules(served: Served) -> None:
    rules = [
        rule
        for group in load_yaml(DEPLOY / "prometheus" / "alerts.yaml")["groups"]
        for rule in group["rules"]
    ]
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    used: set[str] = set()
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        duration_seconds(rule["for"])
        expr = str(rule["expr"])
        assert expr.count("(") == expr.count(")"), rule["alert"]
        unknown = metric_names(expr) - served.metrics - PROMETHEUS_METRICS
        assert not unknown, f"{rule['alert']}: no relay exports {sorted(unknown)}"
        used |= metric_names(expr)
    # what the issue asks to be alerted on
    assert {
        "outbox_oldest_pending_age_seconds",  # oldest pending age
        "outbox_dead_messages",  # dead messages
        "outbox_stuck_keys",  # held-back keys
        "up",  # relay down
        "outbox_relay_seconds_since_progress",  # no progress
    } <= used
    # the scrape job the rules select on exists, and loads these rules
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert "alerts.yaml" in config["rule_files"]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    for rule in rules:
        for job in re.findall(r'job="([^"]+)"', str(rule["expr"])):
            assert job in jobs
    compose_port = _compose()["services"]["relay"]["expose"]
    [compose_job] = [j for j in config["scrape_configs"] if "dns_sd_configs" in j]
    assert [str(compose_job["dns_sd_configs"][0]["port"])] == [str(p) for p in compose_port]


def test_grafana_dashboard(served: Served) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "outbox.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    queries = 0
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"].strip("${}") in variables
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "5m")
            unknown = metric_names(expr) - served.metrics - PROMETHEUS_METRICS
            assert not unknown, f"panel {panel['title']!r}: no relay exports {sorted(unknown)}"
            queries += 1
    assert queries >= 10


def test_probe_paths_are_the_relays_endpoints(served: Served) -> None:
    assert served.status == {"/healthz": 200, "/readyz": 200, "/metrics": 200, "/no-such-path": 404}
    assert "outbox_oldest_pending_age_seconds" in served.metrics


def test_the_shop_app_writes_orders(tmp_path: Path) -> None:
    """The example app of compose.yaml runs: orders and their messages land in the outbox."""
    from examples import shop_app

    url = f"sqlite:///{tmp_path / 'shop.db'}"
    assert shop_app.main(["--database-url", url, "--interval", "0", "--orders", "6"]) == 0
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT topic, COUNT(*) FROM outbox GROUP BY topic")).all()
        topics = {str(topic): int(count) for topic, count in rows}
        assert topics["order.created"] >= 1
    finally:
        engine.dispose()
