"""Routes files (robust_cert.routes): validation with file:line errors, which rule applies,
and the registry gate reading one inside a real `mlflow server`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from robust_cert.cli import main
from robust_cert.data import digits_split
from robust_cert.routes import RoutesError, load_routes
from tests.conftest import gate_env, start_mlflow_server, stop_mlflow_server

POLICY = textwrap.dedent("""\
    name: {name}
    metrics: {{accuracy: {{}}}}
    requirements: [{{metric: accuracy, at_least: 0.0}}]
    """)


@pytest.fixture
def folder(tmp_path):
    """A folder with two policies (vision, tabular) and an evaluation set."""
    (tmp_path / "vision.yaml").write_text(POLICY.format(name="vision"))
    (tmp_path / "tabular.yaml").write_text(POLICY.format(name="tabular"))
    x, y = digits_split("test")
    np.savez(tmp_path / "eval.npz", x=x[:40], y=y[:40])
    return tmp_path


def _write(folder, text: str):
    path = folder / "routes.yaml"
    path.write_text(textwrap.dedent(text))
    return path


ROUTES = """\
    routes:
      - match: "vision-*"
        policy: vision.yaml
        data: eval.npz
      - match: "tabular-*"
        policies: [tabular.yaml, vision.yaml]
        data: eval.npz
        gate: required
      - match: "forecast-*"
        gate: exempt
    default: required
    """


def test_first_matching_rule_applies(folder):
    routes = load_routes(_write(folder, ROUTES))
    vision = routes.route_for("vision-cnn")
    assert (vision.index, vision.gate, [p.name for p in vision.policies]) == \
        (1, "required", ["vision"])
    assert vision.data == folder / "eval.npz"
    assert [p.name for p in routes.route_for("tabular-fraud").policies] == ["tabular", "vision"]
    assert routes.route_for("forecast-sales").gate == "exempt"
    other = routes.route_for("llm-prompt")
    assert (other.index, other.gate, other.policies) == (None, "required", ())
    assert "no rule's glob matches 'llm-prompt'" in other.why
    # a certificate satisfies a rule by policy name AND hash
    p = vision.policies[0]
    assert vision.accepts("vision", p.sha256)
    assert not vision.accepts("vision", "0" * 64)
    assert not vision.accepts("tabular", routes.route_for("tabular-x").policies[0].sha256)
    assert routes.warnings == ()
    assert len(routes.digest) == 64


def test_digest_follows_the_policies(folder):
    path = _write(folder, ROUTES)
    before = load_routes(path).digest
    (folder / "vision.yaml").write_text(POLICY.format(name="vision").replace("0.0", "0.2"))
    assert load_routes(path).digest != before  # a changed policy changes what the file means


def test_unreachable_rules_are_warned(folder):
    routes = load_routes(_write(folder, """\
        routes:
          - match: "vision-*"
            gate: exempt
          - match: "vision-cnn"
            gate: exempt
          - match: "*"
            gate: exempt
          - match: "tabular-*"
            gate: exempt
        """))
    assert routes.warnings == (
        "rule 2 ('vision-cnn') is unreachable: rule 1 ('vision-*') matches every model it "
        "matches",
        "rule 4 ('tabular-*') is unreachable: rule 3 ('*') matches every model it matches")


@pytest.mark.parametrize(("text", "message"), [
    ("", "routes.yaml: the routes file is empty"),
    ("routes: []\n", "routes.yaml:1: routes: List should have at least 1 item"),
    ("routes:\n  - match: 'a-*'\n    gate: maybe\n",
     "routes.yaml:3: routes.0.gate: Input should be 'required' or 'exempt'"),
    ("routes:\n  - match: 'a-*'\n    data: eval.npz\n",
     "routes.yaml:2: routes.0: Value error, a required rule names its policy"),
    ("routes:\n  - match: 'a-*'\n    gate: exempt\n  - match: 'b-*'\n    policy: vision.yaml\n",
     "routes.yaml:4: routes.1: Value error, a required rule names its evaluation data"),
    ("routes:\n  - match: 'a-*'\n    gate: exempt\n    policy: vision.yaml\n",
     "routes.yaml:2: routes.0: Value error, an exempt rule certifies nothing: remove policy"),
    ("routes:\n  - match: 'a-*'\n    policy: missing.yaml\n    data: eval.npz\n",
     "routes.yaml:2: rule 1 ('a-*'): policy file"),
    ("routes:\n  - match: 'a-*'\n    policy: vision.yaml\n    data: gone.npz\n",
     "routes.yaml:2: rule 1 ('a-*'): data"),
    ("routes:\n  - match: 'a-*'\n    gate: exempt\n    colour: red\n",
     "routes.yaml:4: routes.0.colour: Extra inputs are not permitted"),
    ("routes:\n  - match: 'a-*'\n    policy: vision.yaml\n    data: {path: eval.npz, sha256: 12}\n",
     "routes.yaml:4: routes.0.data.sha256: Input should be a valid string"),
    ("routes: [\n", "routes.yaml:2: not valid YAML"),
])
def test_bad_routes_files(folder, text, message):
    with pytest.raises(RoutesError) as info:
        load_routes(_write(folder, text))
    assert str(info.value).startswith(str(folder / message.split(":")[0]) +
                                      message[len(message.split(":")[0]):]), str(info.value)


def test_pinned_data(folder):
    from robust_cert.data import load_data

    actual = load_data(str(folder / "eval.npz")).sha256
    good = ROUTES.replace("        data: eval.npz\n      - match: \"tabular",
                          f"        data: {{path: eval.npz, sha256: {actual}}}\n"
                          "      - match: \"tabular", 1)
    routes = load_routes(_write(folder, good))
    assert routes.route_for("vision-a").data_sha256 == actual
    with pytest.raises(RoutesError, match=f"has SHA-256 {actual}, not the pinned {'f' * 64}"):
        load_routes(_write(folder, good.replace(actual, "f" * 64)))
    load_routes(_write(folder, good.replace(actual, "f" * 64)), check_data=False)  # the gate


def test_routes_command(folder, capsys):
    path = _write(folder, ROUTES)
    assert main(["routes", str(path), "--model", "tabular-fraud"]) == 0
    out = capsys.readouterr().out
    assert "3 rules, default required" in out
    assert "tabular-fraud: rule 2 ('tabular-*')" in out
    assert "policy: tabular (" in out
    assert main(["routes", str(_write(folder, "routes: []\n"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "routes.yaml:1: routes: List should have at least 1 item" in err[0]


# ---- the gate, in a real server ------------------------------------------------------------
@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """A gated `mlflow server` started with ROBUST_CERT_ROUTES: (url, folder)."""
    folder = tmp_path_factory.mktemp("routed")
    (folder / "vision.yaml").write_text(POLICY.format(name="vision"))
    (folder / "tabular.yaml").write_text(POLICY.format(name="tabular"))
    x, y = digits_split("test")
    np.savez(folder / "eval.npz", x=x[:40], y=y[:40])
    routes = folder / "routes.yaml"
    routes.write_text(textwrap.dedent(ROUTES))
    db = folder / "mlflow.db"
    proc, url = start_mlflow_server(folder, f"sqlite:///{db}", f"robustcert+sqlite:///{db}",
                                    gate_env(ROBUST_CERT_ROUTES=str(routes)))
    yield url, folder
    stop_mlflow_server(proc)


def _register(url, name):
    import mlflow
    import torch

    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(model, name="m", serialization_format="pickle",
                                        input_example=np.zeros((2, 1, 8, 8), np.float32),
                                        registered_model_name=name, pip_requirements=["torch"])
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    return str(info.registered_model_version)


def _client(url):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


@pytest.mark.integration
def test_gate_follows_the_routes(routed, tmp_path):
    from mlflow.exceptions import MlflowException

    url, folder = routed
    client = _client(url)
    # exempt: promoted with no certificate at all
    v = _register(url, "forecast-sales")
    client.set_registered_model_alias("forecast-sales", "production", v)
    # required, certified under another rule's policy: refused, naming the rule and policy
    v = _register(url, "vision-cnn")
    assert main(["certify", f"models:/vision-cnn/{v}", "--policy", str(folder / "tabular.yaml"),
                 "--data", str(folder / "eval.npz"), "--tracking-uri", url,
                 "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    with pytest.raises(MlflowException) as info:
        client.set_registered_model_alias("vision-cnn", "production", v)
    message = info.value.message
    assert "falls under rule 1 ('vision-*') of the routes file" in message
    assert "requires a certificate under policy 'vision'" in message
    assert "certified under 'tabular'" in message
    # under its own rule's policy: accepted
    assert main(["certify", f"models:/vision-cnn/{v}", "--policy", str(folder / "vision.yaml"),
                 "--data", str(folder / "eval.npz"), "--tracking-uri", url,
                 "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    client.set_registered_model_alias("vision-cnn", "production", v)
    assert client.get_registered_model("vision-cnn").aliases["production"] == v
    # no rule matches: the default (required) applies, as without a routes file
    v = _register(url, "llm-prompt")
    with pytest.raises(MlflowException, match="has no signed robust_cert certificate"):
        client.set_registered_model_alias("llm-prompt", "production", v)


@pytest.mark.integration
def test_promote_takes_policy_and_data_from_the_routes(routed, tmp_path, capsys):
    url, folder = routed
    v = _register(url, "tabular-fraud")
    assert main(["promote", "tabular-fraud", v, "--routes", str(folder / "routes.yaml"),
                 "--tracking-uri", url, "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"tabular-fraud v{v} is now @production" in out
    tags = _client(url).get_model_version("tabular-fraud", v).tags
    assert tags["robust_cert.policy"] == "tabular"  # the rule's first policy
    v = _register(url, "forecast-demand")
    assert main(["promote", "forecast-demand", v, "--routes", str(folder / "routes.yaml"),
                 "--tracking-uri", url, "--no-progress"]) == 0
    assert "is exempt (rule 3 ('forecast-*')" in capsys.readouterr().out


@pytest.mark.integration
def test_an_invalid_routes_file_stops_the_server(tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text("routes:\n  - match: 'a-*'\n    gate: sometimes\n")
    db = tmp_path / "mlflow.db"
    env = gate_env(ROBUST_CERT_ROUTES=str(routes))
    with pytest.raises(RuntimeError, match="mlflow server did not start") as info:
        start_mlflow_server(tmp_path, f"sqlite:///{db}", f"robustcert+sqlite:///{db}", env)
    assert f"{routes}:3: routes.0.gate: Input should be 'required' or 'exempt'" in \
        str(info.value)


def test_doctor_prints_the_routes_digest(folder):
    path = _write(folder, ROUTES)
    digest = load_routes(path).digest
    code = ("import sys\nfrom robust_cert.cli import main\n"
            f"sys.exit(main(['doctor', 'http://127.0.0.1:9', '--routes', {str(path)!r}, "
            "'--model', 'vision-x']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert f"routes {path}: sha256 {digest}" in done.stdout
    assert "vision-x: rule 1 ('vision-*')" in done.stdout
    assert done.returncode == 2  # nothing listens on port 9: the gate check cannot run
    assert "cannot reach the MLflow tracking server" in done.stderr


# ---- bad input through the commands: one line, exit 2, nothing written ----------------------
def _pinned(folder, sha: str) -> str:
    return ROUTES.replace("        data: eval.npz\n      - match: \"tabular",
                          f"        data: {{path: eval.npz, sha256: {sha}}}\n"
                          "      - match: \"tabular", 1)


@pytest.mark.parametrize("case", ["empty", "missing-policy", "missing-data", "stale-pin"])
def test_serve_and_routes_refuse_bad_routes_writing_nothing(folder, case, monkeypatch,
                                                            capsys):
    """`routes FILE` and `serve --routes FILE` (the certifier, with --register): exit 2 with
    one line naming the problem, and no queue file, report folder or webhook left behind."""
    from robust_cert.data import load_data

    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", "s")
    monkeypatch.chdir(folder)
    actual = load_data(str(folder / "eval.npz")).sha256
    text, message = {
        "empty": ("", "routes.yaml: the routes file is empty"),
        "missing-policy": (ROUTES.replace("policy: vision.yaml", "policy: gone.yaml"),
                           "routes.yaml:2: rule 1 ('vision-*'): policy file"),
        "missing-data": (ROUTES.replace("data: eval.npz", "data: gone.npz", 1),
                         "routes.yaml:2: rule 1 ('vision-*'): data"),
        "stale-pin": (_pinned(folder, "e" * 64),
                      f"has SHA-256 {actual}, not the pinned {'e' * 64}"),
    }[case]
    path = _write(folder, text)
    before = sorted(p.name for p in folder.iterdir())
    for argv in (["routes", str(path)],
                 ["serve", "--routes", str(path), "--queue-url", str(folder / "q.db"),
                  "--port", "0", "--out", str(folder / "reports"),
                  "--register", "http://127.0.0.1:9/webhook"]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1, captured.err
        assert message in err[0], err[0]
        assert "registered webhook" not in captured.out
    assert sorted(p.name for p in folder.iterdir()) == before  # no q.db*, reports, lock


def test_routes_warns_about_unreachable_rules_and_globs_matching_nothing(folder, tmp_path,
                                                                         capsys):
    """Warnings, exit 0: a rule an earlier glob covers, and (against a registry) a glob that
    matches none of its registered models."""
    from mlflow.tracking import MlflowClient

    path = _write(folder, ROUTES.replace("    default: required",
                                         "      - match: \"vision-cnn\"\n"
                                         "        gate: exempt\n    default: required"))
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    client = MlflowClient(tracking_uri=registry, registry_uri=registry)
    client.create_registered_model("vision-cnn")
    client.create_registered_model("forecast-sales")
    assert main(["routes", str(path), "--tracking-uri", registry]) == 0
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("robust-cert")]  # (MLflow logs its database set-up there too)
    assert err == [
        "robust-cert: warning: rule 4 ('vision-cnn') is unreachable: rule 1 ('vision-*') "
        "matches every model it matches",
        "robust-cert: warning: rule 2 ('tabular-*') matches none of the 2 registered models"]
    # without a registry, only the unreachable rule is warned about
    assert main(["routes", str(path)]) == 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
