"""The command line as a face: help that reads as written, errors in flags, a fast start.

The library names parameters as Python does (``sample_rate``); the CLI shows the same
messages with its flags (``--sample-rate``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer

from dpledger import __version__
from dpledger.cli import app
from dpledger.cli.common import flagged

HEAVY = ("torch", "opacus", "altair", "scipy", "sqlalchemy", "sklearn", "ray")


def _commands() -> list[list[str]]:
    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            out += [[name, sub] for sub in cmd.commands]
        else:
            out.append([name])
    return out


def test_bare_dpledger_and_bare_groups_show_their_help(cli):
    r = cli()
    assert r.rc == 0 and "Usage: dpledger [OPTIONS] COMMAND" in r.out and "error" not in r.err
    r = cli("ingest")
    assert r.rc == 0 and "Usage: dpledger ingest [OPTIONS] COMMAND" in r.out and "gla-csv" in r.out


def test_version(cli):
    r = cli("--version")
    assert r.rc == 0 and r.out.strip() == f"dpledger {__version__}"


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_has_readable_help(cli, command):
    r = cli(*command, "--help")
    assert r.rc == 0, r
    assert "<bool>" not in r.out  # flags take no value, so the help shows none
    options = [line for line in r.out.splitlines() if line.strip().startswith("-")]
    assert options, r.out
    for line in options:  # every option says what it is for (a name alone is not help)
        assert len(line.split("  ")) > 1 or line.strip().startswith("--help"), line


def test_help_text_keeps_its_brackets(cli):
    r = cli("sweep", "--help")
    assert "[base]" in r.out and "[grid]" in r.out and "[[runs]]" in r.out


def test_json_and_format_agree(gla_db, cli):
    as_json = cli("runs", "--db", gla_db, "--json").json()
    assert cli("runs", "--db", gla_db, "--format", "json").json() == as_json
    assert as_json[0]["run_id"] == "res1"


def test_flagged_names_parameters_as_flags():
    assert flagged("sample_rate 2 is outside (0, 1]", ("sample_rate",)) == "--sample-rate 2 is outside (0, 1]"
    assert flagged("give steps or epochs, not both", ("steps", "epochs")) == "give --steps or --epochs, not both"
    # whole words only: a parameter named inside another word or flag is left alone
    assert flagged("max_steps and steps_covered", ("steps",)) == "max_steps and steps_covered"
    assert flagged("no params here", ()) == "no params here"
    assert flagged("dataset nope: unknown dataset 'nope'", ("dataset",)) == "--dataset nope: unknown dataset 'nope'"
    # nor inside a path, and a sentence's full stop is not part of a name
    assert flagged("out /tmp/out/r.html is a folder", ("out",)) == "--out /tmp/out/r.html is a folder"
    assert flagged("give steps or epochs.", ("steps", "epochs")) == "give --steps or --epochs."
    assert flagged("give run_ids RUN or config KEY", ("run_ids", "config")) == "give --run RUN or --config KEY"


def test_library_errors_reach_the_cli_as_flags(cli):
    r = cli("budget", "--sample-rate", "2", "--delta", "1e-5", "--noise-multiplier", "1", "--steps", "10")
    assert r.rc == 2 and r.err.startswith("error: --sample-rate 2") and "sample_rate" not in r.err, r.err
    r = cli("budget", "--sample-rate", "0.01", "--delta", "1e-5", "--noise-multiplier", "1")
    assert r.rc == 2 and "--steps" in r.err and "--epochs" in r.err, r.err


def test_query_refuses_several_statements(gla_db, cli):
    r = cli("query", "select 1; select 2", "--db", gla_db)
    assert r.rc == 2 and "one SELECT statement" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, needs", [
    (["--help"], []), (["query", "select 1 AS x", "--db", "{db}"], []),
    (["runs", "--db", "{db}"], []),  # the run's epsilon comes from dp_epsilon_memo: no RDP, no scipy
])
def test_light_commands_start_without_the_heavy_libraries(gla_db, args, needs):
    """--help, query and runs import no torch, opacus, altair, SQLAlchemy, sklearn or Ray (nor scipy unless needed)."""
    probe = ("import sys\nfrom dpledger.cli import main\nrc = main(sys.argv[1:])\n"
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), rc, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", probe, *[a.format(db=gla_db) for a in args]], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.stderr.strip().splitlines()[-1] == f"{needs} 0", r.stderr


def test_runs_lists_the_run_epsilon_and_the_covered_share(gla_db, cli):
    from opacus.accountants import RDPAccountant

    from dpledger.analysis.rdp import DEFAULT_ORDERS

    (run,) = cli("runs", "--db", gla_db, "--json").json()
    assert run["steps"] == 9375  # the study's 40 epochs at q = 256/60000, as Opacus counts them
    acc = RDPAccountant()
    acc.history = [(run["noise_multiplier"], run["sample_rate"], run["steps"])]
    assert abs(run["epsilon"] - acc.get_epsilon(delta=run["delta"], alphas=list(DEFAULT_ORDERS))) < 1e-9
    assert round(run["epsilon"], 4) == 11.2572
    assert run["covered"] == 1.0  # norms recorded from step 0
    table = cli("runs", "--db", gla_db).out
    assert "epsilon" in table and "covered" in table


def test_train_says_the_run_epsilon_and_the_calibrated_sigma(db, cli):
    from opacus.accountants import RDPAccountant

    from dpledger.analysis.rdp import DEFAULT_ORDERS

    small = ["--dataset", "digits", "--model", "logreg", "--n-train", "60", "--batch-size", "20", "--epochs", "2",
             "--track", "3"]
    r = cli("train", *small, "--target-epsilon", "3", "--db", db, "--json")
    assert r.rc == 0, r
    s = r.json()
    acc = RDPAccountant()
    acc.history = [(s["noise_multiplier"], s["sample_rate"], s["steps"])]
    assert s["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5, alphas=list(DEFAULT_ORDERS)), rel=1e-9)
    assert s["epsilon"] <= 3 and s["delta"] == 1e-5 and s["steps"] == 6  # floor(2 / (20/60))
    r = cli("train", *small, "--target-epsilon", "3", "--run", "again", "--db", db)
    assert f"data-independent epsilon of the run: {s['epsilon']:.4g} at delta 1e-05" in r.out
    assert f"noise multiplier {s['noise_multiplier']:.6g} calibrated for target epsilon 3" in r.out
    (listed,) = [run for run in cli("runs", "--db", db, "--json").json() if run["run_id"] == s["run_id"]]
    assert listed["epsilon"] == pytest.approx(s["epsilon"], rel=1e-12)  # remembered at the merge, not recomputed
    r = cli("train", *small, "--disable-dp", "--db", db)
    assert r.rc == 0 and "not private" in r.out and "data-independent epsilon" not in r.out


def test_json_everywhere_and_format_where_there_is_a_table():
    """One rule: every command takes --json; the commands that print a table (query, runs,
    rank, links) also take --format table|json|csv (json the same as --json)."""
    group = typer.main.get_command(app)

    def options(command):
        cmd = group
        for part in command:
            cmd = cmd.commands[part]
        return {o for p in cmd.params for o in getattr(p, "opts", [])}

    tables = {("query",), ("runs",), ("rank",), ("links",)}
    for command in map(tuple, _commands()):
        have = options(command)
        assert "--json" in have, command
        assert ("--format" in have) == (command in tables), command
