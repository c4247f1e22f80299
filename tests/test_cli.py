"""The command line: each flag's environment equivalent (a Job made from the CronJob takes no
arguments), and `--help` naming every variable the job reads (the image carries no README)."""

from __future__ import annotations

import ast
import contextlib
import inspect
import re
from collections.abc import Iterator, Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lapi_kv_sync as job
from tests.conftest import SCRIPT
from tests.standins import decision

FLAG_DESTS = {option: option[2:].replace("-", "_") for option, _, _ in job.RUN_FLAGS}


class Recording(Mapping):
    """An environment that remembers every name looked up in it."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values, self.asked = values, set()

    def __getitem__(self, name: str) -> str:
        self.asked.add(name)
        return self.values[name]

    def get(self, name, default=None):
        self.asked.add(name)
        return self.values.get(name, default)

    def __contains__(self, name) -> bool:
        self.asked.add(name)
        return name in self.values

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("load_config must look names up, not list the environment")

    def __len__(self) -> int:
        return len(self.values)


ENV_NAME = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")


def looked_up_anywhere() -> set[str]:
    """Names the whole module looks up by `x.get("NAME")`, `x["NAME"]` or `os.getenv("NAME")`:
    a variable read outside load_config counts too."""
    names = set()

    def environment(node: ast.AST) -> bool:  # `env`, `environ`, `os.environ`: not any dict's .get()
        return getattr(node, "id", getattr(node, "attr", "")) in ("env", "environ", "environment")

    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        key = None
        if isinstance(node, ast.Call) and (
            getattr(node.func, "attr", getattr(node.func, "id", "")) == "getenv"
            or getattr(node.func, "attr", "") == "get"
            and environment(node.func.value)
        ):
            key = node.args[0] if node.args else None
        elif isinstance(node, ast.Subscript) and environment(node.value):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and ENV_NAME.fullmatch(key.value):
            names.add(key.value)
    return names


def variables_read() -> set[str]:
    """Every variable the job reads: the upper-case string constants in load_config's source (a
    name read only on some path counts too), with *_FILE for each secret; every name it looks up
    when run on an empty and on a full environment; and every name looked up elsewhere."""
    tree = ast.parse(inspect.getsource(job.load_config))
    names = {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and ENV_NAME.fullmatch(n.value)
    }
    names |= looked_up_anywhere()
    secrets = {
        n.args[0].value
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "secret" and isinstance(n.args[0], ast.Constant)
    }
    names |= {name + "_FILE" for name in secrets}
    for values in ({}, {name: "1" for name in names}):
        env = Recording(values)
        with contextlib.suppress(job.ConfigError):
            job.load_config(env)
        names |= env.asked
    return names


def test_variables_read_are_found():
    """The scan above finds what it must, so the tests built on it can fail."""
    read = variables_read()
    assert {"LAPI_URL", "LAPI_KEY", "LAPI_KEY_FILE", "CF_API_TOKEN_FILE", "MAX_DELETES", "LOG_FORMAT"} <= read
    # Upper case, but for the proxy variables' lower-case forms, which curl and Python read first.
    assert all(name.isupper() or name.upper() in job.PROXY_VARIABLES for name in read)
    assert {"HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"} <= read
    assert {"KV_KEY_PREFIX"} <= looked_up_anywhere() <= read  # env.get("KV_KEY_PREFIX", "ip:")


def help_text(capsys) -> str:
    with pytest.raises(SystemExit) as done:
        job.parse_args(["--help"], {})
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_variable_the_job_reads_one_line_each(capsys):
    text = help_text(capsys)
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()}
    for name in {name if name.isupper() else name.upper() for name in variables_read()}:  # https_proxy: HTTPS_PROXY
        assert name in lines, f"--help does not list {name}"
        assert len(lines[name].split()) > 1, f"{name} has no meaning on its line"
    assert all(name.lower() in lines["HTTP_PROXY"] for name in job.PROXY_VARIABLES)
    for option, variable, _ in job.RUN_FLAGS:
        assert f"{variable}=true" in lines and option in lines[f"{variable}=true"]


@pytest.mark.parametrize("option", list(FLAG_DESTS))
@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", " true "])
def test_each_flag_is_set_by_its_variable(option, value):
    variable = next(v for o, v, _ in job.RUN_FLAGS if o == option)
    args = job.parse_args([], {variable: value})
    assert getattr(args, FLAG_DESTS[option]) is True
    assert [dest for dest in FLAG_DESTS.values() if getattr(args, dest)] == [FLAG_DESTS[option]]


@pytest.mark.parametrize("value", ["false", "0", "no", "", "  "])
def test_a_false_variable_leaves_the_flag_as_given(value):
    env = {variable: value for _, variable, _ in job.RUN_FLAGS}
    assert not any(vars(job.parse_args([], env))[dest] for dest in FLAG_DESTS.values())
    assert job.parse_args(["--dry-run"], env).dry_run is True  # the command line still counts


@given(st.text(max_size=12).filter(lambda v: v.strip().lower() not in job.FLAG_VALUES))
def test_any_other_value_is_a_configuration_error_naming_the_variable(value):
    for _, variable, _ in job.RUN_FLAGS:
        with pytest.raises(job.ConfigError) as error:
            job.parse_args([], {variable: value})
        assert [p.split()[0] for p in error.value.problems] == [variable]


def test_a_bad_flag_variable_exits_2_along_with_every_other_bad_variable(stack):
    result = stack.run(DRY_RUN="sure", CF_ACCOUNT_ID="not an id")
    assert result.code == job.EXIT_CONFIG
    assert "DRY_RUN must be true or false, got 'sure'" in result.err and "CF_ACCOUNT_ID" in result.err
    assert stack.kv.writes == 0 and stack.lapi.queries == []


def test_a_lapi_url_with_the_api_path_exits_2_in_one_message_with_every_other_bad_variable(stack):
    result = stack.run(LAPI_URL=stack.lapi.url + "/v1/decisions", CF_ACCOUNT_ID="not an id")
    assert result.code == job.EXIT_CONFIG and stack.lapi.queries == []
    assert "LAPI_URL is LAPI's base URL" in result.err and f"set {stack.lapi.url!r}" in result.err
    assert "CF_ACCOUNT_ID must be a Cloudflare identifier" in result.err


def test_a_404_from_lapi_shows_the_url_asked_and_says_lapi_url_is_the_base(stack):
    """A path the configuration check cannot know is wrong (a proxy's prefix mistyped): LAPI's 404
    names the URL the job asked and what LAPI_URL must be."""
    stack.lapi.decisions = [decision("192.0.2.1")]
    result = stack.run(LAPI_URL=stack.lapi.url + "/crowdsec")
    assert result.code == job.EXIT_LAPI and stack.kv.writes == 0
    asked = f"{stack.lapi.url}/crowdsec/v1/decisions?scopes=ip,range,country,as"
    assert f"LAPI answered HTTP 404 to GET {asked}: " in result.err
    assert f"(LAPI_URL='{stack.lapi.url}/crowdsec' must be LAPI's base URL, its scheme, host and port" in result.err
    stack.lapi.answer = (500, b'{"message":"db locked"}', "application/json")
    result = stack.run()
    assert (
        result.code == job.EXIT_LAPI and f"LAPI answered HTTP 500 to GET {stack.lapi.url}/v1/decisions?" in result.err
    )
    assert "must be LAPI's base URL" not in result.err


def test_dry_run_from_the_environment_writes_and_pushes_nothing(stack):
    stack.lapi.decisions = [decision("192.0.2.1")]
    result = stack.run_process(env=stack.env(DRY_RUN="true"))
    assert result.code == 0, result.err
    assert stack.kv.writes == 0 and stack.kv.live() == {}
    assert stack.push.pushes == []


def test_force_from_the_environment_lifts_the_delete_guard(stack):
    stack.lapi.decisions = [decision("192.0.2.1"), decision("192.0.2.2")]
    assert stack.run().code == 0
    stack.lapi.decisions = []
    assert stack.run(MAX_DELETES="1").code == job.EXIT_CLOUDFLARE
    assert len(stack.kv.live()) == 2
    assert stack.run(MAX_DELETES="1", FORCE="true").code == 0
    assert stack.kv.live() == {}


def test_the_script_runs_the_same_from_its_file(stack):
    """`python3 lapi_kv_sync.py --help` (the image's entrypoint) prints the same list."""
    result = stack.run_process("--help")
    assert result.code == 0 and all(name in result.out for name, _ in job.ENVIRONMENT)
    assert SCRIPT.name == "lapi_kv_sync.py"


# --------------------------------------------------------------------------- variables set but not read


def test_the_known_variables_are_exactly_those_the_job_reads():
    """One list: what a misspelling is measured against is what load_config and the flags read."""
    assert variables_read() | {variable for _, variable, _ in job.RUN_FLAGS} == job.KNOWN_VARIABLES


@pytest.mark.parametrize(
    ("set_as", "meant", "value"),
    [("DRYRUN", "DRY_RUN", "true"), ("MAX_DELETE", "MAX_DELETES", "1"), ("dry_run", "DRY_RUN", "true")],
)
def test_a_misspelled_variable_is_a_configuration_error_naming_both(stack, set_as, meant, value):
    stack.lapi.decisions = [decision("192.0.2.1")]
    result = stack.run(**{set_as: value})
    assert result.code == job.EXIT_CONFIG
    assert f"{set_as} is not a variable this job reads: did you mean {meant}?" in result.err
    assert stack.kv.writes == 0 and stack.lapi.queries == []


def test_an_unknown_variable_with_the_jobs_prefix_gets_one_warning(stack):
    stack.lapi.decisions = [decision("192.0.2.1")]
    result = stack.run(CF_ZONE_ID="abc", LAPI_PORT_NAME="x", KV_PREFIX="ip:")
    assert result.code == 0, result.err
    (line,) = [line for line in result.err.splitlines() if "not read" in line]
    assert line.startswith("lapi-kv-sync: warning:") and "CF_ZONE_ID, KV_PREFIX, LAPI_PORT_NAME" in line
    assert set(stack.kv.live()) == {"ip:192.0.2.1"}


def test_a_name_that_differs_in_its_first_letter_is_none_of_the_jobs_business():
    """API_KEY and API_URL (other tools' settings, in a shared envFrom) are as close to LAPI_KEY and
    LAPI_URL as a typo; taking them for misspellings would stop every run."""
    assert job.unread_variables(["API_KEY", "API_URL", "RUN_DEADLINES"]) == (
        ["RUN_DEADLINES is not a variable this job reads: did you mean RUN_DEADLINE?"],
        [],
    )


def test_a_containers_usual_environment_trips_nothing():
    """What a python image, Kubernetes (a Service per name in the namespace, `lapi` one of them)
    and a shell put in the environment is none of the job's business."""
    usual = [
        "HOSTNAME",
        "HOME",
        "PATH",
        "LANG",
        "TERM",
        "PWD",
        "SHLVL",
        "TZ",
        "PYTHONPATH",
        "PYTHONUNBUFFERED",
        "PYTHON_VERSION",
        "PYTHON_SHA256",
        "PYTHON_PIP_VERSION",
        "GPG_KEY",
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
        "KUBERNETES_SERVICE_PORT_HTTPS",
        "KUBERNETES_PORT",
        "KUBERNETES_PORT_443_TCP",
        "KUBERNETES_PORT_443_TCP_ADDR",
        "KUBERNETES_PORT_443_TCP_PORT",
        "KUBERNETES_PORT_443_TCP_PROTO",
        "LAPI_SERVICE_HOST",
        "LAPI_SERVICE_PORT",
        "LAPI_PORT",
        "LAPI_PORT_8080_TCP",
        "LAPI_PORT_8080_TCP_ADDR",
        "LAPI_KV_SYNC_SERVICE_HOST",
        "https_proxy",
        "NO_PROXY",
        "SSL_CERT_FILE",
        "CLOUDFLARE_API_TOKEN",
        "CLOUDFLARE_ACCOUNT_ID",
        "POD_NAMESPACE",
        "STATE",
        "FORCE_COLOR",
        "PYTEST_CURRENT_TEST",
    ]
    assert job.unread_variables(usual) == ([], [])


@given(st.sampled_from(sorted(job.KNOWN_VARIABLES)), st.data())
def test_one_letter_dropped_or_doubled_in_a_long_name_is_caught(name, data):
    """Any known name of 8 letters or more, one character dropped or doubled, is a misspelling of it
    (its first letter kept: API_KEY is not taken for LAPI_KEY)."""
    if len(name) < 8:
        return
    at = data.draw(st.integers(0, len(name) - 1))
    typos = [name[:at] + name[at] + name[at:]]  # a letter doubled
    if at > 0:
        typos.append(name[:at] + name[at + 1 :])  # a letter dropped, not the first
    typo = data.draw(st.sampled_from(typos))
    if typo in job.KNOWN_VARIABLES:
        return
    misspelled, unknown = job.unread_variables([typo])
    assert len(misspelled) == 1 and misspelled[0].startswith(f"{typo} is not a variable") and unknown == []


def test_a_state_file_in_a_directory_that_does_not_exist_is_a_configuration_error(stack, tmp_path):
    path = tmp_path / "not-mounted" / "record.gz"
    result = stack.run(STATE_FILE=str(path))
    assert result.code == job.EXIT_CONFIG
    assert f"STATE_FILE: the directory {path.parent} of {path} does not exist" in result.err
    assert sum(stack.kv.requests.values()) == 0 and stack.lapi.queries == []
    assert stack.run(STATE_FILE=str(tmp_path / "record.gz")).code == 0  # its directory exists


def test_a_prefix_without_a_separator_is_warned_about(stack):
    stack.lapi.decisions = [decision("192.0.2.1")]
    slip = stack.run(KV_KEY_PREFIX="crowdsec")
    assert slip.code == 0 and "crowdsec192.0.2.1" in stack.kv.live()
    assert (
        "warning: KV_KEY_PREFIX='crowdsec' ends with a letter or digit: keys are named like 'crowdsec192.0.2.1'; "
        "end it with a separator (e.g. 'crowdsec:')" in slip.err
    )
    for fine in ("ip:", "crowdsec/", "cs-", "cs_"):
        assert "KV_KEY_PREFIX" not in stack.run(KV_KEY_PREFIX=fine).err
